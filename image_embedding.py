"""The image embedding: what the image UNet can be conditioned on and what prior.py learns to generate.

An embedding is EfficientNet-Lite2's pooled ImageNet features of a painting (features.TEACHER; never Lite0, the FD
judge), projected on their top principal components over the training paintings and whitened, so each of its D
dimensions has unit variance there (RCG, Li, Katabi, He 2023, conditions on a self-supervised representation in
the same way; DALL-E 2's unCLIP on a CLIP image embedding). Conditioning the UNet on it gives variations of a
painting (its embedding, fresh noise) and blends of two (a mix of their embeddings).

    python image_embedding.py --data ../shared/wikiart-mini --out runs/embeddings

writes OUT/embedder.safetensors + .json (the PCA: what turns any image into an embedding) and OUT/cache.safetensors
+ .json (embeddings N x D of every painting, row-aligned with trainer.py's latent cache of the same images, and
their captions for a caption-conditioned prior). A mirrored painting shares its painting's embedding: the UNet
learns that an embedding leaves left and right open, and the teacher runs once a painting (about 10 minutes for
10,010 paintings at 128 px on 2 cores).
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from checkpoints import load_model, save_model
from cli import ArgumentParser, UserError, check_output_folder, non_negative_int, positive_int, run_cli
from features import TEACHER, EfficientNetLiteFeatures, fit_pca
from images import ImageSource, IndexedImages, collate_skip_none
from text_encoder import caption_function

EMBED_DIM = 64        # principal components kept
TEACHER_SIZE = 128    # images are resized to this for the teacher: the bundled models' crops, 3x cheaper than 224
PCA_IMAGES = 4000     # the first paintings, whose features fit the PCA


class ImageEmbedder(nn.Module):
    """Images B x 3 x H x W in [-1, 1] -> whitened embeddings B x dim: (pooled Lite2 features - mean) projected
    on `components` (dim x F) and divided by each component's standard deviation `scale` (dim)."""

    def __init__(self, dim=EMBED_DIM, feature_dim=1280, image_size=TEACHER_SIZE):
        super().__init__()
        self.config = {"model": "noise2art-image-embedder", "teacher": TEACHER, "dim": dim,
                       "feature_dim": feature_dim, "image_size": image_size}
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("components", torch.zeros(dim, feature_dim))
        self.register_buffer("scale", torch.ones(dim))
        self._teacher = None  # loaded on first use: fitting and loading need only the buffers

    @property
    def teacher(self):
        if self._teacher is None:  # kept out of the module's state: the package ships its weights
            object.__setattr__(self, "_teacher", EfficientNetLiteFeatures(TEACHER).to(self.mean.device))
        return self._teacher

    @torch.no_grad()
    def features(self, images):
        """The teacher's pooled features B x F (its head before the classifier, averaged over positions) of images
        resized to image_size, in fp32 whatever the autocast around, so embeddings do not depend on it."""
        size = (self.config["image_size"],) * 2
        images = images.float().to(self.mean.device)
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        with torch.autocast(images.device.type, enabled=False):
            return self.teacher.net.extract_features(images).float().mean(dim=(2, 3))

    def project(self, features):
        """Features B x F -> whitened embeddings B x dim."""
        return (features - self.mean) @ self.components.T / self.scale

    def forward(self, images):
        return self.project(self.features(images))

    @torch.no_grad()
    def fit(self, features):
        """Fit the PCA and whitening on features N x F (N >= dim)."""
        if len(features) < self.config["dim"]:
            raise UserError(f"fitting a {self.config['dim']}-dimensional embedding needs at least that many images, "
                            f"got {len(features)}")
        mean, components, kept = fit_pca(features, self.config["dim"])  # F, F x dim
        std = ((features - mean) @ components).std(0)  # dim, largest first
        self.mean.copy_(mean)
        self.components.copy_(components.T)
        # a component with (almost) no variance is not blown up to unit variance: it stays (almost) zero
        self.scale.copy_(std.clamp(min=1e-3 * std[0].item()))
        return kept


def save_embedder(embedder, path):
    save_model(path, {k: v.contiguous() for k, v in embedder.state_dict().items()}, embedder.config)


def load_embedder(path, device="cpu"):
    state, config = load_model(path)
    if config.get("model") != "noise2art-image-embedder":
        raise UserError(f"{path} is not an image embedder written by image_embedding.py")
    embedder = ImageEmbedder(config["dim"], config["feature_dim"], config["image_size"])
    embedder.load_state_dict(state)
    return embedder.to(device).eval()


# ----------------------------------------------------------------------------------------------
# The embedding cache of a data set


@torch.no_grad()
def teacher_features(embedder, source, resolution, batch_size, num_workers=0):
    """(rows read, pooled features N x F of each readable painting)."""
    crops = IndexedImages(source, range(len(source)), resolution)  # as the latent cache crops them
    loader = torch.utils.data.DataLoader(crops, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_skip_none)
    rows, features = [], []
    for batch in tqdm(loader, desc="embed", unit="batch"):
        if batch is None:
            continue
        rows += batch[0].tolist()
        features.append(embedder.features(batch[1]))  # B x F
    return rows, torch.cat(features)


def build_embeddings(data, out, resolution=128, dim=EMBED_DIM, batch_size=64, num_workers=0, split="train",
                     image_column="image", caption_template="a {style} painting", device="cpu", embedder=None):
    """Write OUT/embedder and OUT/cache (module docstring). `embedder`: an existing ImageEmbedder to embed with (to
    train on a model conditioned in its space, e.g. models/embedder), else one fitted here. Returns the fraction of
    the feature variance kept (None with a given embedder)."""
    source = ImageSource(data, split, image_column)
    fitted = embedder is None
    embedder = ImageEmbedder(dim).to(device) if fitted else embedder.to(device)
    dim = embedder.config["dim"]
    rows, features = teacher_features(embedder, source, resolution, batch_size, num_workers)
    kept = embedder.fit(features[:PCA_IMAGES]) if fitted else None
    embeddings = embedder.project(features)  # N x D
    caption_of = caption_function(source.columns, caption_template=caption_template) if caption_template else None
    captions = [caption_of(source.metadata(row)) for row in rows] if caption_of else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_embedder(embedder, out / "embedder")
    save_model(out / "cache", {"embeddings": embeddings.half().contiguous()},
               {"model": "noise2art-embedding-cache", "dim": dim, "rows": len(rows), "captions": captions,
                "data": str(data), "resolution": resolution, "variance_kept": kept})
    return kept


def load_embedding_cache(path):
    """(embeddings N x D float32, captions: N strings or None) of a cache written by build_embeddings; anything else
    is a UserError naming what is wrong."""
    tensors, config = load_model(path, "embedding cache")
    if config.get("model") != "noise2art-embedding-cache":
        raise UserError(f"{path} is not an embedding cache written by image_embedding.py")
    embeddings, dim, captions = tensors.get("embeddings"), config.get("dim"), config.get("captions")
    if embeddings is None or embeddings.ndim != 2 or embeddings.shape[1] != dim or len(embeddings) < 2:
        shape = None if embeddings is None else tuple(embeddings.shape)
        raise UserError(f"embedding cache {path}: expected N x {dim} embeddings (N >= 2, dim as its JSON says), got "
                        f"{shape}")
    if not torch.isfinite(embeddings).all():
        raise UserError(f"embedding cache {path} holds NaN or infinite embeddings")
    if captions is not None and (not isinstance(captions, list) or len(captions) != len(embeddings)
                                 or not all(isinstance(c, str) for c in captions)):
        raise UserError(f"embedding cache {path}: 'captions' must be null or a list of {len(embeddings)} strings")
    return embeddings.float(), captions


def main(argv=None):
    parser = ArgumentParser(__file__, description="Embed a data set's paintings (EfficientNet-Lite2 + whitened PCA) "
                                                  "for an embedding-conditioned UNet and its prior.")
    parser.add_argument("--data", required=True, help="ImageFolder, image folder or Hugging Face dataset path")
    parser.add_argument("--out", required=True, help="output folder: embedder.* and cache.*")
    parser.add_argument("--split", default="train", help="dataset split (Hugging Face datasets)")
    parser.add_argument("--image_column", default="image", help="image column (Hugging Face datasets)")
    parser.add_argument("--resolution", type=positive_int, default=128,
                        help="centre crop size, as the latent cache's (then resized for the teacher)")
    parser.add_argument("--dim", type=positive_int, default=EMBED_DIM, help="principal components kept")
    parser.add_argument("--embedder", default=None,
                        help="embed with this existing embedder (e.g. models/embedder, to train models/unet-like on) "
                             "instead of fitting a new PCA; --dim is then its")
    parser.add_argument("--caption_template", default="a {style} painting",
                        help="captions for a caption-conditioned prior, from metadata columns ('' for none)")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="paintings per teacher batch")
    parser.add_argument("--num_workers", type=non_negative_int, default=0, help="image-decoding processes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    args = parser.parse_args(argv)
    check_output_folder(args.out, "--out")
    embedder = None if args.embedder is None else load_embedder(args.embedder)
    kept = build_embeddings(args.data, args.out, args.resolution, args.dim, args.batch_size, args.num_workers,
                            args.split, args.image_column, args.caption_template or None, args.device, embedder)
    print(f"wrote {args.out}/embedder and {args.out}/cache"
          + ("" if kept is None else f"; the {args.dim} components keep {kept:.1%} of the teacher's feature variance"))
    return 0


if __name__ == "__main__":
    run_cli(main)
