"""What a UNet trains on: the latent cache (every image of a data set and its mirror image encoded once by the frozen
VQGAN, with its captions encoded by the text encoder), read back from a cache folder or from packed latents
(packing.py), the image embeddings beside it (image_embedding.py), and REPA's targets (frozen EfficientNet-Lite2
feature maps reduced by PCA, in a second cache beside the latents); then the batches a training step reads from it.

A cache is a save_state_dir folder (tensors.safetensors + state.json), written atomically by rank 0 and keyed by
everything its tensors depend on (cache_identity, repa_identity); it is rebuilt when any of them changes.
"""
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import CorruptCheckpoint, file_digest, load_state_dir, read_json, save_state_dir
from cli import UserError
from devices import autocast
from distributed import barrier, is_main, say
from features import TEACHER, EfficientNetLiteFeatures, fit_pca
from image_embedding import load_embedding_cache
from images import IndexedImages, collate_skip_none
from packing import read_packed_latents
from text_encoder import caption_function

CACHE_FORMAT = 1  # bump when the cache layout changes, so old caches are rebuilt


# ----------------------------------------------------------------------------------------------
# Latent cache: a save_state_dir folder (tensors.safetensors + state.json), written atomically by rank 0.
# latents: N x 2 x C x h x w float16, unscaled VQGAN latents of each image ([:, 0]) and its mirror image ([:, 1]);
# with captions: captions (the U distinct ones), caption_ids N, context U x L x D float16, context_mask U x L bool.


def dataset_identity(source):
    """What the data set of an ImageSource is: its name or resolved path, split, column and size, and for a local
    folder or file a digest of every file's path, size and bytes (so edited, added or replaced files are noticed,
    while a copy of the same files, with new modification times, is the same data set; hashing costs about 0.15 s
    per 140 MB)."""
    path = Path(source.path)
    identity = dict(path=str(path.resolve()) if path.exists() else source.path, split=source.split,
                    image_column=source.image_column, rows=len(source))
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if files:
        listing = "".join(f"{file.relative_to(path.parent)}\t{file.stat().st_size}\n" for file in files)
        identity["files"] = hashlib.sha256((listing + file_digest(files)).encode()).hexdigest()
    return identity


def cache_identity(dataset, max_images, resolution, vqgan_digest, bf16, captions):
    """Everything the cached tensors depend on (`dataset`: dataset_identity; `vqgan_digest`: vqgan.latents_digest,
    blind to the decoder; `captions`: caption_settings, None for an unconditional run); its hash is the cache key."""
    return dict(format=CACHE_FORMAT, vqgan=vqgan_digest, dataset=dataset, max_images=max_images,
                resolution=resolution, bf16=bf16, captions=captions)


def cache_key(identity):
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def encode_captions(captions, text_encoder, batch_size=256):
    """Captions (one per cached image) -> distinct captions, caption_ids, their token embeddings and masks."""
    distinct = list(dict.fromkeys(captions))
    ids = {caption: i for i, caption in enumerate(distinct)}
    contexts, masks = zip(*(text_encoder.encode(distinct[i:i + batch_size])
                            for i in range(0, len(distinct), batch_size)))
    return dict(captions=distinct, caption_ids=torch.tensor([ids[c] for c in captions]),
                context=torch.cat(contexts).half().cpu(), context_mask=torch.cat(masks).cpu())


@torch.no_grad()
def build_latent_cache(source, rows, vqgan, resolution, batch_size, device, bf16=False, caption_of=None,
                       text_encoder=None, num_workers=0, progress=True):
    """Encode `rows` of `source` (centre crop and its mirror image) with the frozen VQGAN; unreadable images are
    skipped. The latent scale is the VQGAN's own when it has one (latent_scale != 1, measured when it was trained),
    else the measured 1 / std of these latents: diffusion runs on latents * latent_scale (about unit variance)."""
    loader = torch.utils.data.DataLoader(IndexedImages(source, rows, resolution), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate_skip_none)
    kept, chunks = [], []
    for batch in tqdm(loader, desc="encode", unit="batch", disable=not progress, leave=False):
        if batch is None:
            continue
        batch_rows, images = batch
        images = images.to(device)
        with autocast(device, bf16):
            latents = vqgan.encode(torch.cat([images, images.flip(-1)])).float()  # 2B x C x h x w
        chunks.append(torch.stack(latents.chunk(2), dim=1).half().cpu())  # B x 2 x C x h x w
        kept += batch_rows.tolist()
    if not kept:
        raise UserError(f"none of the {len(rows)} images of {source.path} could be read")
    latents = torch.cat(chunks).contiguous()  # the encoder's channels-last layout, made plain for safetensors
    measured = 1.0 / latents.double().std().item()
    from_vqgan = vqgan.latent_scale != 1.0
    cache = dict(latents=latents, skipped=len(rows) - len(kept), measured_latent_scale=measured,
                 latent_scale=vqgan.latent_scale if from_vqgan else measured,
                 latent_scale_source="vqgan" if from_vqgan else "measured")
    if caption_of is not None:
        cache.update(encode_captions([caption_of(source.metadata(row)) for row in kept], text_encoder))
    return cache


CAPTION_KEYS = ("captions", "caption_ids", "context", "context_mask")  # what encode_captions adds to a cache


def read_latent_cache(path, identity, what="latent cache", uncaptioned_ok=False):
    """The cache at `path` if it was built for `identity`; None (saying why) if absent or built for other inputs.
    An unconditional run also uses the latents of a cache built with captions (a conditional run's) and ignores
    the captions, so the two runs of one data set encode it once; with `uncaptioned_ok`, a conditional run gets
    an unconditional run's cache of the same images (none unreadable) as it is, to caption. `what` names the cache
    in messages."""
    if not path.exists():
        return None
    if not (path / "state.json").is_file():
        raise UserError(f"{what} {path} exists and is not a {what}: choose another --latent_cache")
    try:
        cache = load_state_dir(path)
    except CorruptCheckpoint as err:
        say(f"{what}: {err}: re-encoding")
        return None
    if not isinstance(cache, dict) or "key" not in cache:
        raise UserError(f"{what} {path} is not a {what} (a checkpoint?): choose another --latent_cache")
    if cache["key"] == cache_key(identity):
        return cache
    old = cache.get("identity", {})
    if identity.get("captions") is None and cache_key({**old, "captions": None}) == cache_key(identity):
        say(f"latent cache {path} was built with captions: this unconditional run uses its latents alone")
        return {k: v for k, v in cache.items() if k not in CAPTION_KEYS}
    if (uncaptioned_ok and old.get("captions") is None and not cache["skipped"]
            and cache["key"] == cache_key({**identity, "captions": None})):
        return cache
    changed = sorted(k for k in set(identity) | set(old) if identity.get(k) != old.get(k))
    say(f"{what} {path} was built for another {', '.join(changed)}: re-encoding")
    return None


def load_or_build_cache(path, identity, build, what="latent cache", rows_key="latents", caption=None):
    """Rank 0 reuses the cache at `path` or calls build() and writes it; the other ranks wait, then read it.
    `rows_key` names the tensor with one row per image (for the messages). `caption()` (a conditional run's
    captions of every image, as encode_captions gives them) completes an unconditional run's cache of the same
    images in place of encoding them again."""
    cache = None
    if is_main():
        cache = read_latent_cache(path, identity, what, uncaptioned_ok=caption is not None)
        if caption is not None and cache is not None and cache["key"] != cache_key(identity):  # uncaptioned
            cache = {**cache, **caption(), "key": cache_key(identity), "identity": identity}
            save_state_dir(path, cache)
            say(f"{what}: added this run's captions to the {len(cache[rows_key])} images of {path}")
        elif cache is None:
            cache = {"key": cache_key(identity), "identity": identity, **build()}
            save_state_dir(path, cache)
            say(f"{what}: encoded {len(cache[rows_key])} images into {path}")
        else:
            say(f"{what}: reusing {path} ({len(cache[rows_key])} images)")
    barrier()
    if cache is None:
        cache = read_latent_cache(path, identity, what)
        if cache is None:
            raise UserError(f"cannot read the latent cache {path} written by rank 0: multi-node training needs "
                            "--latent_cache on a filesystem all nodes share")
    return cache


def dataset_cache(path, source, vqgan, resolution, vqgan_digest, device, max_images=None, batch_size=32, bf16=False,
                  num_workers=0, captions=None, text_encoder=None, repa=None):
    """The latent cache of the ImageSource `source` (its first `max_images` rows): read from the folder `path`, or
    encoded and written there. `captions` (caption_settings: column, template, text encoder, length; None:
    unconditional) says how `text_encoder` captions it; `repa` ({"image_size", "channels"}, None: no REPA) adds the
    images' REPA targets from a cache beside it."""
    rows = list(range(min(len(source), max_images or len(source))))
    caption_of = None if captions is None else caption_function(source.columns, captions["column"],
                                                                captions["template"])
    dataset = dataset_identity(source)
    cache = load_or_build_cache(
        path, cache_identity(dataset, max_images, resolution, vqgan_digest, bf16, captions), lambda: build_latent_cache(
            source, rows, vqgan, resolution, batch_size, device, bf16, caption_of, text_encoder,
            num_workers), caption=None if caption_of is None else (
            lambda: encode_captions([caption_of(source.metadata(row)) for row in rows], text_encoder)))
    if repa is not None:
        cache["repa"] = load_repa_targets(
            Path(f"{path}-repa"), repa_identity(dataset, max_images, resolution, repa["image_size"], repa["channels"]),
            lambda: build_repa_cache(source, rows, resolution, repa["image_size"], repa["channels"], batch_size,
                                     device, num_workers), len(cache["latents"]))
    return cache


def packed_cache(path, vqgan, resolution, captions=None):
    """The latent cache that a packed-latents folder `path` (packing.py: VQGAN codes) stands for, with the quantised
    latents z_q in place of z; no image is read and `datasets` is not imported. Its resolution and captions
    (caption_settings; None: an unconditional run, which ignores the pack's captions) must be this run's."""
    cache = read_packed_latents(path, vqgan)
    identity = cache["identity"]
    if identity["resolution"] != resolution:
        raise UserError(f"--packed_latents {path} holds {identity['resolution']} px images, this run "
                        f"trains at --resolution {resolution}")
    if captions is None:
        return {k: v for k, v in cache.items() if k not in CAPTION_KEYS}
    if identity["captions"] != captions:
        raise UserError(f"--packed_latents {path} holds captions {identity['captions']}, not this "
                        f"run's {captions}")
    return cache


def read_image_embeds(folder, num_latents):
    """The image embeddings N x E of an image_embedding.py folder, checked to cover the latent cache's rows."""
    embeds, _ = load_embedding_cache(Path(folder) / "cache")
    if len(embeds) != num_latents:
        raise UserError(f"--image_embeddings {folder} holds {len(embeds)} images, the latent cache {num_latents}: "
                        "embed the same data set (image_embedding.py --data)")
    return embeds


def image_embed_dim(folder):
    """E of an image_embedding.py folder (None: no image embeddings), read before the UNet is built."""
    return None if folder is None else read_json(Path(folder) / "cache.json", "embedding cache config")["dim"]


# ----------------------------------------------------------------------------------------------
# Representation alignment (REPA, Yu et al. 2024): a UNet stage, through a small convolutional projector, is pulled
# towards frozen EfficientNet-Lite2 features of the clean image (never Lite0, the FD judge). The teacher's last
# feature map (stride 32: a g x g grid, g = --repa_image_size / 32, 352 channels) of every cached image and its
# mirror image is computed once, reduced by PCA to --repa_channels and kept in a second cache beside the latents:
# repa: N x 2 x K x g x g float16, row-aligned with the latent cache (the same rows, the same unreadable ones
# skipped). At 10,010 images x 2, g = 8, K = 64 that is 164 MB (the latents at 128 px: 164 MB).

REPA_PCA_IMAGES = 512  # the first images (and mirrors) whose feature vectors fit the PCA
REPA_FORMAT = 1        # bump when the REPA cache layout changes


def repa_identity(dataset, max_images, resolution, image_size, channels):
    """Everything the REPA targets depend on (its hash is the REPA cache's key): the images (`dataset`:
    dataset_identity), the teacher and the reduction."""
    return {"format": REPA_FORMAT, "dataset": dataset, "max_images": max_images, "resolution": resolution,
            "teacher": TEACHER, "image_size": image_size, "channels": channels, "pca_images": REPA_PCA_IMAGES}


@torch.no_grad()
def teacher_maps(teacher, source, rows, resolution, image_size, batch_size, device, num_workers=0, progress=True):
    """Yields the teacher's last feature map of each readable image of `rows` and its mirror image, batch by
    batch: B x 2 x D x g x g float32 (the centre crop at `resolution`, resized to `image_size`; always in fp32, so
    the targets do not depend on --bf16)."""
    loader = torch.utils.data.DataLoader(IndexedImages(source, rows, resolution), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate_skip_none)
    for batch in tqdm(loader, desc="teacher", unit="batch", disable=not progress, leave=False):
        if batch is None:
            continue
        images = batch[1].to(device)
        images = F.interpolate(torch.cat([images, images.flip(-1)]), size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=True)  # 2B x 3 x S x S
        maps = teacher.feature_maps(images)[-1].float()  # 2B x D x g x g
        yield torch.stack(maps.chunk(2), dim=1)


def project(maps, mean, components):
    """PCA coordinates of feature maps: ... x D x g x g -> ... x K x g x g."""
    return torch.einsum("...dhw,dk->...khw", maps - mean[:, None, None], components)


def build_repa_cache(source, rows, resolution, image_size, channels, batch_size, device, num_workers=0,
                     progress=True):
    """The REPA cache: PCA fitted on the first REPA_PCA_IMAGES rows' feature vectors (every position of the image
    and its mirror), then every row's maps projected onto it."""
    teacher = EfficientNetLiteFeatures(TEACHER).to(device)
    common = {"teacher": teacher, "source": source, "resolution": resolution, "image_size": image_size,
              "batch_size": batch_size, "device": device, "num_workers": num_workers, "progress": progress}
    sample = torch.cat(list(teacher_maps(rows=rows[:REPA_PCA_IMAGES], **common)))  # n x 2 x D x g x g
    if channels > sample.shape[2]:
        raise UserError(f"--repa_channels {channels} is more than the teacher's {sample.shape[2]} channels")
    mean, components, explained = fit_pca(sample.transpose(2, -1).reshape(-1, sample.shape[2]), channels)
    targets = [project(maps, mean, components).half().cpu() for maps in teacher_maps(rows=rows, **common)]
    return {"repa": torch.cat(targets), "pca_mean": mean.cpu(), "pca_components": components.cpu(),
            "explained_variance": explained}


def load_repa_targets(path, identity, build, num_latents):
    """The REPA cache's targets (N x 2 x K x g x g), checked to cover the latent cache's rows."""
    repa = load_or_build_cache(path, identity, build, "REPA cache", "repa")
    if len(repa["repa"]) != num_latents:
        raise UserError(f"the REPA cache {path} holds {len(repa['repa'])} images, the latent cache {num_latents}: "
                        "delete the REPA cache and run again")
    say(f"REPA targets: {tuple(repa['repa'].shape[2:])} per image, PCA keeps "
        f"{repa['explained_variance']:.1%} of the teacher's variance")
    return repa["repa"]


# ----------------------------------------------------------------------------------------------
# Batches: what one micro-batch reads from the cache


def cache_on(cache, device):
    """The cache with its latents and caption embeddings on `device`, moved once (on a GPU, gathering each batch
    from host memory and copying it over would cost more than indexing there); a no-op on the CPU."""
    return {k: v.to(device) if k in ("latents", "context", "context_mask") else v for k, v in cache.items()}


def cache_batch(cache, rows, device):
    """(scaled latents B x C x h x w, context B x L x D or None, mask B x L or None, REPA targets B x K x g x g or
    None, image embeddings B x E or None) for cache rows; each sample is the image or its mirror image at random,
    its REPA targets those of the same image and flip, its embedding the painting's (a mirror shares it)."""
    flips = torch.randint(0, 2, (len(rows),))
    latents = cache["latents"][rows, flips].to(device).float() * cache["latent_scale"]
    targets = cache["repa"][rows, flips].to(device).float() if "repa" in cache else None
    embeds = cache["image_embeds"][rows].to(device).float() if "image_embeds" in cache else None
    if "caption_ids" not in cache:
        return latents, None, None, targets, embeds
    ids = cache["caption_ids"][rows]
    return latents, cache["context"][ids].to(device).float(), cache["context_mask"][ids].to(device), targets, embeds


