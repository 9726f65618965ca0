"""The VQGAN's training losses (taming-transformers, Esser et al. 2021): the PatchGAN discriminator with its hinge
loss and R1 penalty, the adaptive GAN weight, the perceptual distances (LPIPS-VGG, with the conversion of
torchvision's VGG16 and of taming checkpoints, or EfficientNet-Lite2 feature maps) and the weights that combine
them (LossWeights). vqgan.py's training step uses them; the model itself needs none of this.
"""
import dataclasses
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_weights, read_checkpoint_tensors, safe_torch_load
from cli import UserError


# ----------------------------------------------------------------------------------------------
# PatchGAN discriminator and perceptual distances (names as in taming-transformers / lpips)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix): images B x 3 x H x W -> real/fake logits B x 1 x h x w."""

    def __init__(self, n_layers=2, ndf=64, in_channels=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev_mult, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev_mult, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images):
        return self.main(images)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def r1_penalty(disc, images):
    """(logits on `images`, E_x |grad_x D(x)|^2 over them): the R1 penalty (Mescheder et al. 2018) on real images
    keeps the discriminator smooth around the data so it cannot overpower the decoder. The penalty is
    differentiable in the discriminator's weights (create_graph)."""
    images = images.detach().requires_grad_(True)
    logits = disc(images).float()
    (grads,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
    return logits, grads.float().square().flatten(1).sum(1).mean()


def adaptive_gan_weight(nll_loss, g_loss, last_layer):
    """Scale that makes the GAN gradient at the decoder's last layer as large as the
    reconstruction gradient (Esser et al. 2021, eq. 7)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grads.norm() / (g_grads.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def unit_channels(x, eps=1e-10):
    return x / (x.norm(dim=1, keepdim=True) + eps)


VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]  # vgg16.features indices up to relu1_2 ... relu5_3
LPIPS_CHANNELS = [64, 128, 256, 512, 512]
TORCHVISION_VGG16 = "vgg16-397923af.pth"


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018): frozen VGG16 features, unit-normalised per channel, squared
    differences weighted by learned 1x1 convs. forward(a, b) -> B distances."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.scaling_layer.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        layers, channels = [], 3
        for v in VGG16_LAYERS:  # the same indices as torchvision's vgg16().features
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.net = nn.Module()
        for k, (start, end) in enumerate(LPIPS_SLICES, 1):
            setattr(self.net, f"slice{k}", nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(start, end))))
        for k, channels in enumerate(LPIPS_CHANNELS):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))
            setattr(self, f"lin{k}", lin)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode=True):  # always frozen
        return super().train(False)

    def forward(self, images_a, images_b):
        h_a = (images_a - self.scaling_layer.shift) / self.scaling_layer.scale
        h_b = (images_b - self.scaling_layer.shift) / self.scaling_layer.scale
        distance = 0.0
        for k in range(len(LPIPS_SLICES)):
            vgg_slice = getattr(self.net, f"slice{k + 1}")
            h_a, h_b = vgg_slice(h_a), vgg_slice(h_b)
            squared = (unit_channels(h_a) - unit_channels(h_b)).pow(2)
            distance = distance + getattr(self, f"lin{k}").model(squared).mean(dim=(1, 2, 3))
        return distance


def vgg16_to_lpips(tensors):
    """torchvision vgg16 `features.{i}.*` -> LPIPS `net.slice{k}.{i}.*`."""
    renamed = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[1].isdigit():
            for k, (start, end) in enumerate(LPIPS_SLICES, 1):
                if start <= int(parts[1]) < end:
                    renamed[f"net.slice{k}.{parts[1]}.{parts[2]}"] = value
    return renamed


def load_lpips(weights_path, init_tensors, trust):
    """LPIPS-VGG with weights from, first found first: --perceptual_weights (an LPIPS state dict, its
    linear layers only, or a taming/latent-diffusion checkpoint), the `loss.perceptual_loss.*` entries of
    --init_ckpt, the torchvision VGG16 file in the torch hub cache and the `lpips` package's linear layers."""
    found = {}

    def add(tensors):
        for key, value in tensors.items():
            # lins.N is lpips' alias of the linN ModuleList
            key = re.sub(r"^lins\.(\d+)\.", r"lin\1.", key.removeprefix("loss.perceptual_loss."))
            found.setdefault(key, value)

    if weights_path:
        add(read_checkpoint_tensors(weights_path, trust))
    add({k: v for k, v in init_tensors.items() if k.startswith("loss.perceptual_loss.")})
    vgg_file = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16
    if vgg_file.is_file():
        add(vgg16_to_lpips(safe_torch_load(vgg_file)))
    try:
        import lpips

        add(safe_torch_load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"))
    except ImportError:
        pass
    model = LPIPS()
    expected = model.state_dict()
    missing = [k for k in expected if k not in found and not k.startswith("scaling_layer.")]
    if missing:
        raise UserError(
            f"LPIPS-VGG weights not found (missing {missing[0]}): pass --perceptual_weights FILE, put "
            f"{TORCHVISION_VGG16} in {vgg_file.parent} and pip install lpips, or use --perceptual effnet"
        )
    load_weights(model, {k: found.get(k, v) for k, v in expected.items()}, "LPIPS weights")
    return model


class EffNetPerceptual(nn.Module):
    """features.perceptual_distance on frozen EfficientNet-Lite2 feature maps: forward(a, b) -> B distances.
    Lite2, not Lite0: Lite0 is the network evaluate.py judges samples in, so it is never a training signal."""

    def __init__(self):
        super().__init__()
        from features import TEACHER, EfficientNetLiteFeatures

        self.features = EfficientNetLiteFeatures(TEACHER)

    def forward(self, images_a, images_b):
        from features import perceptual_distance

        return perceptual_distance(self.features, images_a, images_b)


def build_perceptual(kind, init_tensors, lpips_weights=None, trust_checkpoint=False):
    """The perceptual loss network `kind` ("none": None, "effnet" or "lpips-vgg": from `lpips_weights`, else from
    the LPIPS layers of `init_tensors`)."""
    if kind == "none":
        return None
    if kind == "effnet":
        return EffNetPerceptual()
    return load_lpips(lpips_weights, init_tensors, trust_checkpoint)


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The autoencoder loss: l1 + perceptual * perceptual distance + codebook * codebook loss, plus, from step
    disc_start + disc_warmup on, disc * adaptive weight * GAN loss (Esser et al. 2021, eq. 7); the discriminator
    trains from disc_start on, its hinge loss plus disc_r1 / 2 * the R1 penalty. disc_start None: no GAN at all."""
    perceptual: float = 1.0
    codebook: float = 1.0
    disc: float = 0.6
    disc_start: int | None = 10000
    disc_warmup: int = 0
    disc_r1: float = 0.0
