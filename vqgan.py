"""VQGAN: paintings <-> small latents (Esser et al. 2021, taming-transformers; the first stage of
Rombach et al. 2022, latent-diffusion).

Parameter names and shapes follow the published checkpoints, so the `vq-f8` model.ckpt of
latent-diffusion loads strictly and can be fine-tuned on art; small configurations train from scratch
on a CPU.

    python vqgan.py --config vq-f4-small --data ../shared/wikiart-mini --out runs/vq   # train
    python vqgan.py --config vq-f8 --init_ckpt model.ckpt --max_steps 0 --out runs/f8 # convert
    python vqgan.py --eval --ckpt runs/vq/vqgan --data ../shared/wikiart-mini --split test
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, load_model, save_model

# Architecture of each named model. `vq-f8` is latent-diffusion's models/first_stage_models/vq-f8.
CONFIGS = {
    "vq-f8": dict(resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 2, 4], num_res_blocks=2,
                  attn_resolutions=[32], dropout=0.0, z_channels=4, embed_dim=4, n_embed=16384, beta=0.25),
    "vq-f4-small": dict(resolution=128, in_channels=3, out_ch=3, ch=64, ch_mult=[1, 2, 2], num_res_blocks=1,
                        attn_resolutions=[], dropout=0.0, z_channels=4, embed_dim=4, n_embed=2048, beta=0.25),
    "vq-f4-tiny": dict(resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 1], num_res_blocks=1,
                       attn_resolutions=[], dropout=0.0, z_channels=4, embed_dim=4, n_embed=256, beta=0.25),
}


# ----------------------------------------------------------------------------------------------
# Encoder / decoder (names as in ldm/modules/diffusionmodules/model.py)


def normalize(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, dropout):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1-conv projections."""

    def __init__(self, channels):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        q, k, v = (proj(x_norm).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # B x 1 x hw x C
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (right/bottom) zero padding."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels, dropout):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def run_mid(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def run_level(level, h):
    """Res blocks of one resolution, each followed by its attention block where there is one."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def make_level(channels_in, channels_out, num_blocks, with_attn, dropout):
    level = nn.Module()
    level.block = nn.ModuleList(
        ResnetBlock(channels_in if i == 0 else channels_out, channels_out, dropout) for i in range(num_blocks)
    )
    level.attn = nn.ModuleList(AttnBlock(channels_out) for _ in range(num_blocks if with_attn else 0))
    return level


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, in_channels, resolution, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            level = make_level(channels, ch * mult, num_res_blocks, res in attn_resolutions, dropout)
            channels = ch * mult
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(channels)
                res //= 2
            self.down.append(level)
        self.mid = mid_block(channels, dropout)
        self.norm_out = normalize(channels)
        self.conv_out = nn.Conv2d(channels, z_channels, 3, padding=1)

    def forward(self, images):
        h = self.conv_in(images)
        for level in self.down:
            h = run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, out_ch, resolution, z_channels):
        super().__init__()
        channels = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
        self.mid = mid_block(channels, dropout)
        levels = []  # built from the lowest resolution up; stored highest-resolution first
        for i in reversed(range(len(ch_mult))):
            level = make_level(channels, ch * ch_mult[i], num_res_blocks + 1, res in attn_resolutions, dropout)
            channels = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(channels)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(channels)
        self.conv_out = nn.Conv2d(channels, out_ch, 3, padding=1)

    def forward(self, z):
        h = run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# Vector quantizer (taming's VectorQuantizer2: codebook in `embedding.weight`)


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed, embed_dim, beta):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z):
        """z: B x C x h x w -> (z_q with straight-through gradients, codebook loss, indices B x h x w).
        Always fp32: nearest-code search in bf16 would pick wrong codes."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            b, c, h, w = z.shape
            z_flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # N x C
            codebook = self.embedding.weight  # K x C
            distances = z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ codebook.t() + codebook.pow(2).sum(1)
            indices = distances.argmin(dim=1)  # N
            z_q = codebook[indices].view(b, h, w, c).permute(0, 3, 1, 2)
            # codebook term moves codes towards encoder outputs; commitment term (beta) the reverse
            loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
            z_q = z + (z_q - z).detach()
        return z_q, loss, indices.view(b, h, w)


# ----------------------------------------------------------------------------------------------
# The model


class VQModel(nn.Module):
    """encode: images B x 3 x H x W in [-1, 1] -> latents B x embed_dim x H/f x W/f (before quantisation).
    decode: latents -> images (quantised first). Diffusion works on `latents * latent_scale`."""

    def __init__(self, config):
        super().__init__()
        unknown = set(config) - set(CONFIGS["vq-f8"]) - {"latent_scale", "model"}
        missing = set(CONFIGS["vq-f8"]) - set(config)
        if unknown or missing:
            raise UserError(f"bad VQGAN config: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        self.arch = {k: copy.deepcopy(v) for k, v in config.items() if k not in ("latent_scale", "model")}
        self.latent_scale = float(config.get("latent_scale", 1.0))
        c = self.arch
        if c["ch"] % 32 or any((c["ch"] * m) % 32 for m in c["ch_mult"]):
            raise UserError(f"ch * ch_mult must be multiples of 32 (GroupNorm groups): ch {c['ch']}, ch_mult {c['ch_mult']}")
        shared = dict(ch=c["ch"], ch_mult=c["ch_mult"], num_res_blocks=c["num_res_blocks"],
                      attn_resolutions=c["attn_resolutions"], dropout=c["dropout"], resolution=c["resolution"],
                      z_channels=c["z_channels"])
        self.encoder = Encoder(in_channels=c["in_channels"], **shared)
        self.decoder = Decoder(out_ch=c["out_ch"], **shared)
        self.quantize = VectorQuantizer(c["n_embed"], c["embed_dim"], c["beta"])
        self.quant_conv = nn.Conv2d(c["z_channels"], c["embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(c["embed_dim"], c["z_channels"], 1)
        self.downsample_factor = 2 ** (len(c["ch_mult"]) - 1)

    @property
    def config(self):
        return {**copy.deepcopy(self.arch), "latent_scale": self.latent_scale}

    def encode(self, images):
        return self.quant_conv(self.encoder(images))

    def decode(self, latents):
        z_q, _, _ = self.quantize(latents)
        return self.decode_quantized(z_q)

    def decode_quantized(self, z_q):
        return self.decoder(self.post_quant_conv(z_q.to(self.post_quant_conv.weight.dtype)))

    def forward(self, images):
        """-> (reconstructions, codebook loss, code indices B x h x w, latents before quantisation)."""
        latents = self.encode(images)
        z_q, codebook_loss, indices = self.quantize(latents)
        return self.decode_quantized(z_q), codebook_loss, indices, latents

    def last_layer(self):
        """The weight the adaptive GAN weight is measured at."""
        return self.decoder.conv_out.weight


def load_weights(module, tensors, what):
    """Strict load; a mismatch is a UserError naming the first missing, unexpected or misshapen keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    misshapen = [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in tensors and tensors[k].shape != v.shape]
    problems = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)) if keys]
    if problems:
        raise UserError(f"{what} does not match the model ({'; '.join(problems)})")
    module.load_state_dict(tensors, strict=True)


def save_vqgan(model, path, dtype=None):
    """`NAME.safetensors` + `NAME.json` ({"model": "vqgan", architecture, "latent_scale"})."""
    return save_model(path, model.state_dict(), {"model": "vqgan", **model.config}, dtype=dtype)


def load_vqgan(path, device="cpu"):
    """A VQModel written by save_vqgan, in eval mode with gradients off."""
    tensors, config = load_model(path, "VQGAN")
    if config.get("model") != "vqgan":
        raise UserError(f"{path} is not a VQGAN checkpoint (model: {config.get('model')!r})")
    model = VQModel(config)
    load_weights(model, tensors, f"VQGAN checkpoint {path}")
    return model.to(device).eval().requires_grad_(False)
