"""Evaluation for Noise2Art: Fréchet distance and KID between image sets (the feature networks, real-set caching,
sampling a checkpoint first), and the VQGAN evaluation. The metrics themselves live in metrics.py.

Images are float tensors B x 3 x H x W in [-1, 1].

    # Fréchet distance and KID between generated PNGs and a real set, with offline EfficientNet-Lite0 features
    python evaluate.py --real ../shared/wikiart-mini --fake samples --n 1000 --resolution 128 --out results.json
    # the standard FID Inception (pytorch-fid's pt_inception-2015-12-05 weights, a separate download)
    python evaluate.py --real ../shared/wikiart-mini --fake samples --features inception \
        --inception_weights pt_inception-2015-12-05-6726825d.pth
    # generate the fake set from a diffusion checkpoint first (resumable), then score it
    python evaluate.py --samples_from runs/unet/unet.json --n 1000 --real ../shared/wikiart-mini --resolution 128
    # a VQGAN's reconstructions: PSNR, SSIM, codebook usage, reconstruction FD / KID, and a grid PNG
    python evaluate.py --vqgan_ckpt runs/vq-f4-small/vqgan --real ../shared/wikiart-mini --n 256 --grid grid.png
"""
import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models import inception
from tqdm import tqdm, trange

from checkpoints import (
    atomic_write, atomic_write_json, file_digest, load_weights, model_paths, read_json, safe_torch_load,
)
from cli import (
    ArgumentParser, UserError, at_least, check_output_file, check_output_folder, non_negative_int, positive_int,
    require_file, run_cli,
)
from devices import autocast, pick_device
from diffusion import add_sampling_arguments, load_diffusion_model, referenced_vqgan, sampling_options, use_bf16
from features import EFFNET_IMAGE_SIZE, JUDGE, EfficientNetLiteFeatures
from images import ImageSource, ImageTensorDataset, collate_skip_none, image_to_tensor, save_png, tensor_to_images
from metrics import code_statistics, frechet_distance, kid, mean_and_covariance, psnr, ssim
from vqgan import load_vqgan, reconstruction_grid

FEATURE_SIZES = {"effnet-lite0": EFFNET_IMAGE_SIZE, "inception": 299, "thumbnail16": 16}  # features -> input size
FID_INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
RESIZE_POLICY = ("every image (real, generated or reconstructed) is first brought to R x R with --resolution R "
                 "(shorter side resized to R, bicubic, then centre crop; kept as 8-bit RGB, like a saved PNG), then "
                 "to the feature network's input the same way (224 x 224 EfficientNet-Lite0, 299 x 299 Inception); "
                 "without --resolution only the second step is done")
STATS_CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Feature networks: images B x 3 x S x S in [-1, 1] -> B x d


def fid_pool(x, kind="avg"):
    """The pool branch of the TF Inception graph the FID weights come from: 3x3 average pooling that leaves the
    zero padding out of the count (torchvision counts it), or 3x3 max pooling in the last block."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(inception.InceptionA):
    def _forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(fid_pool(x))]


class FIDInceptionC(inception.InceptionC):
    def _forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(fid_pool(x))]


class FIDInceptionE(inception.InceptionE):
    pool = "avg"  # FIDInceptionV3 sets "max" in Mixed_7c

    def _forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(fid_pool(x, self.pool))]


class FIDInceptionV3(inception.Inception3):
    """Inception-v3 laid out as the TF graph of the original FID code, so that pytorch-fid's port of its weights
    (pt_inception-2015-12-05-6726825d.pth) loads key for key: torchvision's architecture with 1008 classes, no aux
    head, and the FID pool branches. forward: images B x 3 x 299 x 299 in [-1, 1] -> B x 2048 pool3 features."""

    LAYERS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]

    def __init__(self):
        blocks = [inception.BasicConv2d, FIDInceptionA, inception.InceptionB, FIDInceptionC, inception.InceptionD,
                  FIDInceptionE, inception.InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, inception_blocks=blocks, init_weights=False)
        self.Mixed_7c.pool = "max"

    def forward(self, images):
        x = images
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        for name in self.LAYERS:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))  # B x 2048


def find_inception_weights(path=None):
    """--inception_weights, else the file in the torch hub cache (where pytorch-fid downloads it)."""
    if path:
        return require_file(path, "Inception weights")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_WEIGHTS
    if not cached.is_file():
        raise UserError(f"--features inception needs the FID Inception weights {FID_INCEPTION_WEIGHTS} (released with "
                        f"pytorch-fid): pass --inception_weights PATH or put the file in {cached.parent}")
    return cached


def load_feature_network(name, device="cpu", inception_weights=None):
    """A frozen network: images B x 3 x S x S in [-1, 1] (S = FEATURE_SIZES[name]) -> B x d features
    (1280 effnet-lite0, 2048 inception, 768 thumbnail16). Channels-last: 1.5-2x faster on CPU. thumbnail16 is no
    network: the pixels of a 16 x 16 colour thumbnail, a judge of composition and palette that shares nothing with
    ImageNet classifiers (so a gain won through EfficientNet-Lite2 features cannot flatter it)."""
    if name == "thumbnail16":
        return lambda images: images.flatten(1)
    if name == "effnet-lite0":
        model = EfficientNetLiteFeatures(JUDGE)
        network = model.pooled
    elif name == "inception":
        path = find_inception_weights(inception_weights)
        state_dict = safe_torch_load(path)
        if not isinstance(state_dict, dict):
            raise UserError(f"{path} is not a state dict of Inception weights")
        model = network = FIDInceptionV3()
        # BatchNorm step counters are unused in eval mode and absent from files saved by older PyTorch versions
        counters = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
        load_weights(model, {**counters, **state_dict}, f"Inception weights {path}")
    else:
        raise UserError(f"unknown feature network {name!r} (choose {', '.join(FEATURE_SIZES)})")
    model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    return network


# ----------------------------------------------------------------------------------------------
# Image sets -> features


def prepare(img, size, resolution=None):
    """PIL image -> 3 x size x size in [-1, 1] for a feature network, as RESIZE_POLICY says."""
    if resolution:
        img = tensor_to_images(image_to_tensor(img, resolution)[None])[0]
    return image_to_tensor(img, size)


class PreparedImages(torch.utils.data.Dataset):
    """Rows `indices` of an ImageSource, prepared for a feature network; unreadable images give None."""

    def __init__(self, source, indices, size, resolution=None):
        self.source, self.indices, self.size, self.resolution = source, indices, size, resolution

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img = self.source.image(self.indices[i])
        return None if img is None else prepare(img, self.size, self.resolution)


def pick_indices(count, n=None):
    """The rows of a set of `count` images to score: all of them, or a fixed random subset of n (seed 0), in order."""
    if n is None or n >= count:
        return list(range(count))
    return sorted(np.random.default_rng(0).choice(count, n, replace=False).tolist())


@torch.no_grad()
def extract_features(network, batches, device):
    """Features N x d (float32 numpy) of an iterable of image batches; None batches (all unreadable) are skipped."""
    features = [network(images.to(device, memory_format=torch.channels_last)).float().cpu()
                for images in batches if images is not None]
    return torch.cat(features).numpy() if features else np.zeros((0, 0), np.float32)


@dataclasses.dataclass(frozen=True)
class RealSet:
    """The real images scored: an ImageSource (`path`, `split`, `image_column`), the rows whose metadata match every
    (column, value) pair of `where` (--real_where), then a fixed random subset of `n` of them (None: all)."""
    path: str
    split: str = "train"
    image_column: str = "image"
    where: tuple = ()
    n: int | None = None


@dataclasses.dataclass(frozen=True)
class Loading:
    """How images are read for the feature network: brought to `resolution` first (None: not), `batch_size` per
    batch, `num_workers` loader processes, on `device`."""
    device: torch.device
    resolution: int | None = None
    batch_size: int = 16
    num_workers: int = 0


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How two feature sets are compared: the feature network's name (FEATURE_SIZES), KID's `kid_subsets` subsets of
    `kid_subset_size` images drawn from `seed`; real-set statistics are cached in `cache_dir` (None: neither read
    nor written); `inception_weights`: the FID Inception file (None: the torch hub cache)."""
    features: str = "effnet-lite0"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0
    cache_dir: str | None = None
    inception_weights: str | None = None


def real_rows(source, where=(), n=None):
    """The rows of the real ImageSource to score: those whose metadata matches every (COLUMN, VALUE) of `where`
    (compared as text; ClassLabel values by name), then a fixed random subset of `n` of them (None: all)."""
    rows = list(range(len(source)))
    for column, value in where:
        values = source.column_values(column)
        rows = [row for row in rows if str(values[row]) == value]
        if not rows:
            raise UserError(f"no --real image has {column} = {value!r} (e.g. {values[0]!r})")
    return [rows[i] for i in pick_indices(len(rows), n)]


def set_features(source, rows, network, size, loading, what):
    """Features of rows `rows` of an ImageSource read as `loading` says; at least 2 readable images are required."""
    dataset = PreparedImages(source, rows, size, loading.resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=loading.batch_size, collate_fn=collate_skip_none,
                                         num_workers=loading.num_workers)
    features = extract_features(network, tqdm(loader, desc=f"{what} features", dynamic_ncols=True), loading.device)
    if len(features) < 2:
        raise UserError(f"{what} set {source.path} has {len(features)} readable image(s); "
                        "the statistics need at least 2")
    return features


# ----------------------------------------------------------------------------------------------
# Real-set statistics, cached as .npz (mu, sigma as pytorch-fid writes them, plus the features for KID)


def real_stats_key(real, count, rows, resolution, network_name, inception_weights=None):
    """Everything the real-set features depend on: the set (`count` images, of which `rows` are scored) and how."""
    path = Path(real.path).resolve() if Path(real.path).exists() else real.path
    key = dict(version=STATS_CACHE_VERSION, real=str(path), split=real.split, image_column=real.image_column,
               images_in_set=count, n=len(rows), seed_of_subset=0, resolution=resolution,
               features=network_name, input_size=FEATURE_SIZES[network_name], resize=RESIZE_POLICY)
    if real.where:  # absent otherwise, so the statistics cached before --real_where existed still serve
        key["where"] = [list(pair) for pair in real.where]
    if network_name == "inception":
        key["weights"] = file_digest(find_inception_weights(inception_weights))[:16]
    return key


def stats_cache_path(cache_dir, key):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{key['features']}-{Path(key['real']).name}-{digest}.npz"


def load_cached_stats(path, key):
    """The cached statistics at `path` if it holds those of `key`, else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["key"])) != key:
                return None
            return {name: data[name] for name in ("mu", "sigma", "features")}
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def save_stats(path, key, stats):
    atomic_write(path, lambda f: np.savez(f, key=np.array(json.dumps(key, sort_keys=True)), **stats))


def real_statistics(real, network, scoring, loading):
    """{"mu", "sigma", "features"} of the RealSet `real`, from scoring.cache_dir where it holds them."""
    source = ImageSource(real.path, real.split, real.image_column)
    rows = real_rows(source, real.where, real.n)
    key = real_stats_key(real, len(source), rows, loading.resolution, scoring.features, scoring.inception_weights)
    path = None if scoring.cache_dir is None else stats_cache_path(scoring.cache_dir, key)
    stats = load_cached_stats(path, key) if path is not None and path.is_file() else None
    if stats is not None:
        print(f"real-set statistics from {path}")
        return stats
    features = set_features(source, rows, network, FEATURE_SIZES[scoring.features], loading, "real")
    mu, sigma = mean_and_covariance(features)
    stats = {"mu": mu, "sigma": sigma, "features": features}
    if path is not None:
        save_stats(path, key, stats)
        print(f"wrote real-set statistics to {path}")
    return stats


# ----------------------------------------------------------------------------------------------
# The three jobs: score a fake set, generate one first, score a VQGAN's reconstructions


def set_metrics(real_features, fake_features, real_mu, real_sigma, scoring, prefix=""):
    """{FD_<net>, KID_<net>, KID_<net>_std} between two feature sets (names carry the feature network)."""
    mu, sigma = mean_and_covariance(fake_features)
    kid_mean, kid_std = kid(real_features, fake_features, scoring.kid_subsets, scoring.kid_subset_size, scoring.seed)
    return {f"{prefix}FD_{scoring.features}": frechet_distance(real_mu, real_sigma, mu, sigma),
            f"{prefix}KID_{scoring.features}": kid_mean, f"{prefix}KID_{scoring.features}_std": kid_std,
            "kid_subset_size": min(scoring.kid_subset_size, len(real_features), len(fake_features)),
            "kid_subsets": scoring.kid_subsets}


def score_sets(real, fake_dir, network, scoring, loading):
    """FD / KID of the RealSet `real` against the images in `fake_dir` (the same n, a fixed subset)."""
    fake_dir = Path(fake_dir)
    stats = real_statistics(real, network, scoring, loading)
    fake = ImageSource(fake_dir)
    fake_features = set_features(fake, pick_indices(len(fake), real.n), network, FEATURE_SIZES[scoring.features],
                                 loading, "fake")
    results = {"real": str(real.path), "real_split": real.split, "real_where": [list(pair) for pair in real.where],
               "fake": str(fake_dir), "n_real": len(stats["features"]), "n_fake": len(fake_features),
               "resolution": loading.resolution}
    return {**results, **set_metrics(stats["features"], fake_features, stats["mu"], stats["sigma"], scoring)}


def checkpoint_digest(path):
    """sha256 (16 hex digits) of what a diffusion checkpoint's samples depend on: its config, its weights and the
    files of the VQGAN it references, so a model replaced in place (a retrained UNet, a fine-tuned decoder) is not
    taken for the one whose samples are already there."""
    weights_path, config_path = model_paths(path)
    files = [require_file(config_path, "diffusion checkpoint config"), require_file(weights_path, "UNet weights")]
    vqgan = referenced_vqgan(path, read_json(config_path, "diffusion checkpoint config"))
    if vqgan is not None:
        files += [require_file(p, "VQGAN file") for p in model_paths(vqgan)]
    return file_digest(files)[:16]


def sample_settings(checkpoint, options, seed=0, prompt=None, ema=True, bf16=False):
    """What the fake set is: the `checkpoint` (its path and digest), every sampling option (`options`, as
    diffusion.sampling_options reads them), the seed, prompt, weights and precision (in samples.json)."""
    return {"checkpoint": str(model_paths(checkpoint)[1].resolve()), "checkpoint_sha256": checkpoint_digest(checkpoint),
            **options, "seed": seed, "prompt": prompt, "ema": ema, "bf16": bf16}


def evaluation_request(real, fake_dir, scoring, loading, settings):
    """Everything an evaluation of generated samples answers to: the real set, the metric and the samples
    (checkpoint digest and sampling options); stored in --out, so --skip_done can tell whether it still holds."""
    return {"real": str(real.path), "real_split": real.split, "real_where": [list(pair) for pair in real.where],
            "n": real.n, "resolution": loading.resolution, "features": scoring.features,
            "kid_subsets": scoring.kid_subsets, "kid_subset_size": scoring.kid_subset_size, "fake": str(fake_dir),
            "samples": settings}


def finished_results(path, request):
    """--skip_done: the results already in the file `path` when they answer this request, None when there are none;
    results of another request (a model retrained in place, other settings) are refused, never silently kept."""
    path = Path(path)
    if not path.is_file():
        return None
    done = read_json(path, "results file")
    if done.get("request") != request:
        raise UserError(f"{path} holds the results of another evaluation (another model, sampling options or real "
                        "set); pass another --out")
    return done


def generate_samples(checkpoint, fake_dir, n, options, settings, device, batch_size=16):
    """Write images 00000.png ... of `n` samples of `checkpoint` into `fake_dir` (image i from settings["seed"] + i;
    `options`: the sampling options), skipping those already there, so an interrupted run resumes; samples.json
    records `settings` (sample_settings) and guards against mixing runs."""
    fake_dir = Path(fake_dir)
    record = fake_dir / "samples.json"
    if record.is_file() and read_json(record, "samples record") != settings:
        raise UserError(f"{fake_dir} holds samples made with other settings (see {record}); pass another --fake")
    atomic_write_json(record, settings)
    paths = [fake_dir / f"{i:05d}.png" for i in range(n)]
    if all(p.is_file() for p in paths):
        return
    pipeline = load_diffusion_model(checkpoint, device, use_ema=settings["ema"], bf16=settings["bf16"])
    seed = settings["seed"]
    for start in trange(0, n, batch_size, desc="sampling", dynamic_ncols=True):
        batch_paths = paths[start:start + batch_size]
        if all(p.is_file() for p in batch_paths):
            continue
        images = pipeline.generate(len(batch_paths), seed + start, **options, prompt=settings["prompt"],
                                   progress=False)
        for i, (path, img) in enumerate(zip(batch_paths, tensor_to_images(images))):
            save_png(path, img, {"parameters": {**settings, "seed": seed + start + i}})


def vqgan_loader(real, resolution, loading):
    """Batches of the RealSet `real` at `resolution`, centre-cropped, as the VQGAN reconstructs them."""
    source = ImageSource(real.path, real.split, real.image_column)
    dataset = torch.utils.data.Subset(ImageTensorDataset(source, resolution, random_crop=False, flip=False),
                                      real_rows(source, real.where, real.n))
    return torch.utils.data.DataLoader(dataset, batch_size=loading.batch_size, collate_fn=collate_skip_none,
                                       num_workers=loading.num_workers)


@torch.no_grad()
def reconstruct(model, images, bf16=False):
    """(reconstructions B x 3 x H x W in [-1, 1], fp32; code indices B x h x w) of a VQGAN."""
    with autocast(images.device, bf16):
        reconstructions, _, indices, _ = model(images)
    return reconstructions.float().clamp(-1, 1), indices


def network_features(network, images, size, device):
    """Features of images B x 3 x H x W in [-1, 1], brought to the network's input as saved PNGs would be."""
    prepared = torch.stack([prepare(img, size) for img in tensor_to_images(images)])
    return extract_features(network, [prepared], device)


@torch.no_grad()
def score_vqgan(vqgan_ckpt, real, network, scoring, loading, bf16=False, reference_split=None, grid=None,
                grid_images=16):
    """The VQGAN evaluation: PSNR and SSIM of the reconstructions of the RealSet `real` at loading.resolution
    (default: the VQGAN's), codebook usage and perplexity, and FD / KID of originals vs reconstructions (bf16
    autocast only when asked for); `reference_split`: against_reference; `grid`: a PNG of the first `grid_images`
    originals over their reconstructions."""
    device = loading.device
    model = load_vqgan(vqgan_ckpt, device)
    resolution = loading.resolution or model.config["resolution"]
    if resolution % model.downsample_factor:
        raise UserError(f"--resolution {resolution} is not a multiple of the VQGAN's factor {model.downsample_factor}")
    size = FEATURE_SIZES[scoring.features]
    seen = {"psnr": [], "ssim": [], "originals": [], "reconstructions": [], "shown": []}
    code_counts = torch.zeros(model.config["n_embed"])
    for images in tqdm(vqgan_loader(real, resolution, loading), desc="reconstructions", dynamic_ncols=True):
        if images is None:
            continue
        images = images.to(device)
        reconstructions, indices = reconstruct(model, images, bf16)
        seen["psnr"].append(psnr(reconstructions, images).cpu())
        seen["ssim"].append(ssim(reconstructions, images).cpu())
        code_counts += torch.bincount(indices.flatten().cpu(), minlength=len(code_counts))
        seen["originals"].append(network_features(network, images, size, device))
        seen["reconstructions"].append(network_features(network, reconstructions, size, device))
        if grid and sum(len(pair[0]) for pair in seen["shown"]) < grid_images:
            seen["shown"].append((images.cpu(), reconstructions.cpu()))
    if sum(len(p) for p in seen["psnr"]) < 2:
        raise UserError(f"{real.path} has fewer than 2 readable images; the statistics need at least 2")
    originals, reconstructions = np.concatenate(seen["originals"]), np.concatenate(seen["reconstructions"])
    mu, sigma = mean_and_covariance(originals)
    usage, perplexity = code_statistics(code_counts)
    results = {"vqgan_ckpt": str(vqgan_ckpt), "real": str(real.path), "real_split": real.split,
               "n": len(originals), "resolution": resolution, "bf16": bf16,
               "PSNR": torch.cat(seen["psnr"]).mean().item(), "SSIM": torch.cat(seen["ssim"]).mean().item(),
               "code_usage": usage, "perplexity": perplexity}
    results.update(set_metrics(originals, reconstructions, mu, sigma, scoring, prefix="r"))
    if reference_split:
        reference = dataclasses.replace(real, split=reference_split, n=None, where=())
        results.update(against_reference(reference, network, originals, reconstructions, scoring, loading))
    if grid:
        save_grid(grid, seen["shown"], grid_images, results)
    return results


def against_reference(reference, network, originals, reconstructions, scoring, loading):
    """--reference_split: the originals and their reconstructions each scored against all of another split (the
    RealSet `reference`), so the decoder's cost reads beside the real-vs-real floor measured the same way: floor_FD
    (originals), dFD (reconstructions) and their ratio dFD_over_floor."""
    stats = real_statistics(reference, network, scoring, loading)
    floor = set_metrics(stats["features"], originals, stats["mu"], stats["sigma"], scoring, "floor_")
    decoded = set_metrics(stats["features"], reconstructions, stats["mu"], stats["sigma"], scoring, "d")
    ratio = decoded[f"dFD_{scoring.features}"] / floor[f"floor_FD_{scoring.features}"]
    return {"reference_split": reference.split, "n_reference": len(stats["features"]), **floor, **decoded,
            "dFD_over_floor": ratio}


def save_grid(path, shown, count, results):
    """PNG of the first `count` originals, each row of them over its row of reconstructions; `results` in its text."""
    originals, reconstructions = (torch.cat([pair[k] for pair in shown])[:count] for k in (0, 1))
    save_png(path, reconstruction_grid(originals, reconstructions), results)
    print(f"wrote {path} (rows of originals, each over its reconstructions)")


def print_table(results, features):
    """The metrics, one per line; every set metric's name carries the feature network it was computed with."""
    print(f"{'metric':<28}value")
    for name, value in results.items():
        if name in ("PSNR", "SSIM", "code_usage", "perplexity", "dFD_over_floor") or name.endswith(f"FD_{features}"):
            print(f"{name + (' (FID)' if name == 'FD_inception' else ''):<28}{value:.4f}")
        elif name.endswith(f"KID_{features}"):
            print(f"{name:<28}{value:.6f} ± {results[name + '_std']:.6f}")
    print(f"({', '.join(f'{k} {results[k]}' for k in ('n', 'n_real', 'n_fake') if k in results)}; "
          f"features {features}; KID over {results['kid_subsets']} subsets of {results['kid_subset_size']})")


# ----------------------------------------------------------------------------------------------
# Command line


def column_equals(text):
    """COLUMN=VALUE -> (COLUMN, VALUE), for --real_where."""
    column, equals, value = text.partition("=")
    if not (column and equals):
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE, e.g. style=Baroque, not {text!r}")
    return column, value


def parse_args(argv):
    parser = ArgumentParser(
        __file__,
        description="Fréchet distance and KID between a real and a generated image set; optionally generate the set "
                    "from a diffusion checkpoint first; or a VQGAN's PSNR, SSIM, codebook usage and reconstruction "
                    "FD / KID.",
        epilog=f"Resizing: {RESIZE_POLICY}. The metric names carry the feature network (FD_effnet-lite0, "
               "FD_inception = the standard FID), so numbers from different networks are never mixed.")
    data = parser.add_argument_group("image sets")
    data.add_argument("--real", required=True,
                      help="real images: an image folder, an ImageFolder (metadata.jsonl) or a dataset name/path "
                           "that datasets.load_dataset reads")
    data.add_argument("--real_split", default=None,
                      help="split of a --real dataset (default: test with --vqgan_ckpt, train otherwise)")
    data.add_argument("--image_column", default="image", help="image column of a --real dataset")
    data.add_argument("--real_where", type=column_equals, action="append", default=[], metavar="COLUMN=VALUE",
                      help="only the --real images whose metadata COLUMN is VALUE (a ClassLabel by name, e.g. "
                           "style=Baroque, to score samples of one prompt against that style); repeatable: all must "
                           "hold")
    data.add_argument("--fake", default=None,
                      help="folder of generated images (with --samples_from: where they are written, default "
                           "CKPT_samples_SAMPLER_STEPS_seedSEED next to the checkpoint)")
    data.add_argument("--n", type=at_least(2), default=None,
                      help="images per set; a set with more uses a fixed random subset of N (default: every image; "
                           "1000 with --samples_from; 256 with --vqgan_ckpt)")
    data.add_argument("--resolution", type=positive_int, default=None,
                      help="bring every image to R x R first (the generation resolution; with --vqgan_ckpt the size it "
                           "reconstructs, default its training resolution)")
    metric = parser.add_argument_group("metrics")
    metric.add_argument("--features", default="effnet-lite0", choices=list(FEATURE_SIZES),
                        help="feature network: effnet-lite0 (offline, 1280-d, 224 px), inception (the standard FID "
                             "Inception-v3, 2048-d, 299 px; needs its weights) or thumbnail16 (the 768 pixel values "
                             "of a 16 x 16 colour thumbnail: composition and palette, no ImageNet network)")
    metric.add_argument("--inception_weights", default=None,
                        help=f"path to {FID_INCEPTION_WEIGHTS} (default: the torch hub cache, "
                             "~/.cache/torch/hub/checkpoints/)")
    metric.add_argument("--kid_subsets", type=positive_int, default=100,
                        help="number of random subsets KID averages over")
    metric.add_argument("--kid_subset_size", type=at_least(2), default=1000,
                        help="images per KID subset (capped at the set sizes)")
    metric.add_argument("--cache_dir", default="~/.cache/noise2art/stats",
                        help="folder for cached real-set statistics (.npz: mu, sigma, features)")
    metric.add_argument("--no_cache", action="store_true", help="neither read nor write cached real-set statistics")
    metric.add_argument("--out", default=None, help="write the results to this JSON file")
    metric.add_argument("--skip_done", action="store_true",
                        help="with --samples_from and --out: when --out already holds this evaluation (the same "
                             "checkpoint files, sampling options, real set and metric) print it and stop; when it "
                             "holds another, stop with an error (so a study script resumes without mixing models)")
    gen = parser.add_argument_group("generating the fake set")
    gen.add_argument("--samples_from", default=None, help="diffusion checkpoint to sample --n images from first")
    add_sampling_arguments(gen)  # the same flags and defaults as diffusion.py; --precision bf16 also the VQGAN's
    gen.add_argument("--prompt", default=None, help="caption for a text-conditioned model")
    gen.add_argument("--seed", type=int, default=0, help="image i comes from seed + i; also seeds KID subsets")
    gen.add_argument("--no_ema", action="store_true", help="sample with the raw weights instead of the EMA ones")
    vq = parser.add_argument_group("a VQGAN's reconstructions (the VQGAN evaluation)")
    vq.add_argument("--vqgan_ckpt", default=None,
                    help="score this VQGAN's reconstructions of --real instead: PSNR, SSIM, codebook usage and "
                         "perplexity, reconstruction FD / KID")
    vq.add_argument("--reference_split", default=None,
                    help="with --vqgan_ckpt: also score the originals (the floor) and their reconstructions against "
                         "every image of this split of --real, e.g. --real_split train --n 1000 --reference_split "
                         "test; reports dFD_over_floor")
    vq.add_argument("--grid", default=None,
                    help="with --vqgan_ckpt: write a PNG of originals over their reconstructions here")
    vq.add_argument("--grid_images", type=positive_int, default=16, help="images in the --grid PNG")
    parser.add_argument("--batch_size", type=positive_int, default=16,
                        help="images per batch (features, sampling, VQGAN)")
    parser.add_argument("--num_workers", type=non_negative_int, default=0, help="data-loading worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    return parser.parse_args(argv)


def check_args(args):
    if args.samples_from and args.vqgan_ckpt:
        raise UserError("--samples_from and --vqgan_ckpt are separate jobs: give one")
    if args.vqgan_ckpt and args.fake:
        raise UserError("--fake does not apply with --vqgan_ckpt (the reconstructions are the second set)")
    if args.grid and not args.vqgan_ckpt:
        raise UserError("--grid shows a VQGAN's reconstructions: it needs --vqgan_ckpt")
    if args.reference_split and not args.vqgan_ckpt:
        raise UserError("--reference_split scores a VQGAN's reconstructions: it needs --vqgan_ckpt")
    if args.skip_done and not (args.samples_from and args.out):
        raise UserError("--skip_done needs --samples_from and --out (the checkpoint digest in --out tells whether "
                        "its results still hold)")
    if not (args.fake or args.samples_from or args.vqgan_ckpt):
        raise UserError("nothing to compare --real with: give --fake DIR, --samples_from CKPT or --vqgan_ckpt CKPT")


def resolve_defaults(args):
    """A copy of `args` with the defaults that follow from other flags filled in (the device picked, --real_split,
    --n, --fake), checked before any slow work."""
    settings = {**vars(args), "device": pick_device(args.device),
                "real_split": args.real_split or ("test" if args.vqgan_ckpt else "train")}
    if args.samples_from:
        checkpoint = require_file(model_paths(args.samples_from)[1], "diffusion checkpoint config").with_suffix("")
        options = sampling_options(args)
        settings["n"] = args.n or 1000
        settings["fake"] = args.fake or f"{checkpoint}_samples_{options['sampler']}_{options['steps']}_seed{args.seed}"
        check_output_folder(settings["fake"], "--fake")
    elif args.fake and not Path(args.fake).is_dir():
        raise UserError(f"fake image folder not found: {args.fake}")
    if args.vqgan_ckpt:
        settings["n"] = args.n or 256
    for flag, path in (("--out", args.out), ("--grid", args.grid)):
        if path:
            check_output_file(path, flag)
    return argparse.Namespace(**settings)


def real_set(args):
    return RealSet(args.real, args.real_split, args.image_column, tuple(args.real_where), args.n)


def loading_of(args):
    return Loading(args.device, args.resolution, args.batch_size, args.num_workers)


def scoring_of(args):
    return Scoring(args.features, args.kid_subsets, args.kid_subset_size, args.seed,
                   None if args.no_cache else args.cache_dir, args.inception_weights)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    args = resolve_defaults(args)
    real, loading, scoring = real_set(args), loading_of(args), scoring_of(args)
    options = sampling_options(args) if args.samples_from else None
    settings = request = None
    if args.samples_from:
        settings = sample_settings(args.samples_from, options, args.seed, args.prompt, not args.no_ema,
                                   use_bf16(args.precision, args.device))
        request = evaluation_request(real, args.fake, scoring, loading, settings)
    done = finished_results(args.out, request) if args.skip_done else None
    if done is not None:
        print_table(done, args.features)
        print(f"kept {args.out}: it already holds this evaluation (--skip_done)")
        return 0
    network = load_feature_network(args.features, args.device, args.inception_weights)
    if args.samples_from:
        generate_samples(args.samples_from, args.fake, args.n, options, settings, args.device, args.batch_size)
    if args.vqgan_ckpt:  # bf16 only when asked for: --precision auto keeps reconstructions in fp32
        results = score_vqgan(args.vqgan_ckpt, real, network, scoring, loading, args.precision == "bf16",
                              args.reference_split, args.grid, args.grid_images)
    else:
        results = score_sets(real, args.fake, network, scoring, loading)
    results.update(features=args.features, resize=RESIZE_POLICY)
    if request is not None:
        results["request"] = request
    print_table(results, args.features)
    if args.out:
        atomic_write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
