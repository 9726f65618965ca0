"""The denoising UNet (Dhariwal & Nichol 2021 "ADM", as used by Rombach et al. 2022 latent diffusion).

ResNet blocks conditioned on the timestep (sinusoidal embedding + MLP, scale-shift GroupNorm), transformer
blocks at chosen resolutions (multi-head self-attention, optional cross-attention to text tokens,
feed-forward; pre-norm), skip connections from every down-path block to the up path. Output convolutions
that end a residual branch start at zero, so a fresh UNet is the identity on its skips and predicts 0.

    python unet.py --size small                   # architecture summary and parameter count
    python unet.py --size base --context_dim 384  # a text-conditioned one
"""
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import ArgumentParser, UserError, positive_int, run_cli

# Named sizes for 4x32x32 latents; "small" (11.7M) is the bundled models' size. Parameter counts (unconditional)
# are printed by `python unet.py --size NAME`.
UNET_CONFIGS = {
    "tiny": dict(model_channels=32, channel_mult=[1, 1], num_res_blocks=1, attention_resolutions=[16], num_heads=2),
    "small": dict(model_channels=64, channel_mult=[1, 2, 2, 2], num_res_blocks=2, attention_resolutions=[16, 8],
                  num_heads=4),
    "medium": dict(model_channels=96, channel_mult=[1, 2, 2, 3], num_res_blocks=2, attention_resolutions=[16, 8],
                   num_heads=6),
    "base": dict(model_channels=128, channel_mult=[1, 2, 3, 4], num_res_blocks=2, attention_resolutions=[16, 8],
                 num_heads=8),
}


def normalization(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


def zero_module(module):
    """Zero a layer's parameters: the residual branch it ends starts as a no-op."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t: B -> B x dim (as in ADM / Transformer)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # B x half
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def mean_token(context, context_mask=None):
    """The mean of a caption's real tokens: B x L x dim (mask B x L, True = real; None = all real) -> B x dim."""
    if context_mask is None:
        return context.mean(dim=1)
    weights = context_mask.to(context.dtype)[..., None]  # B x L x 1
    return (context * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the timestep embedding scales and shifts the second norm."""

    def __init__(self, in_channels, out_channels, emb_channels, dropout):
        super().__init__()
        self.norm1 = normalization(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.norm2 = normalization(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # B x C x 1 x 1 each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention of `x` (B x N x dim) to `context` (B x L x context_dim; x itself when None)."""

    def __init__(self, dim, num_heads, context_dim=None):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None, context_mask=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (z.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for z in (q, k, v))  # B x heads x N x d
        attn_mask = None if context_mask is None else context_mask[:, None, None, :]  # B x 1 x 1 x L, True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context (conditional models only), feed-forward."""

    def __init__(self, dim, num_heads, context_dim=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, num_heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, context=None, context_mask=None):
        x = x + self.self_attn(self.norm1(x))
        if hasattr(self, "cross_attn"):
            x = x + self.cross_attn(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> TransformerBlock -> feature map, residual; the out-projection starts at zero."""

    def __init__(self, channels, num_heads, context_dim=None):
        super().__init__()
        self.norm = normalization(channels)
        self.proj_in = nn.Linear(channels, channels)
        self.block = TransformerBlock(channels, num_heads, context_dim)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x, context=None, context_mask=None):
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # B x hw x C
        tokens = self.proj_out(self.block(tokens, context, context_mask))
        return x + tokens.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.ModuleList):
    """Layers applied in order, each given what it needs: the timestep embedding or the text context."""

    def forward(self, h, emb, context, context_mask):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """x: B x C x h x w noisy latents, t: B timesteps -> B x C x h x w prediction (eps or v).
    `attention_resolutions` are feature-map sizes (e.g. [16, 8] for 32x32 latents) that get transformer
    blocks; `context_dim` (the text encoder's width) adds cross-attention and a learned null embedding.
    `pooled_text_embed` also adds the caption's mean token embedding, through a linear layer that starts at zero, to
    the timestep embedding (as Imagen and SDXL add a pooled text embedding): the caption then shifts every ResNet
    block at every noise level, where cross-attention reaches only the attention resolutions. `image_embed_dim` adds
    an image embedding (image_embedding.py; RCG / unCLIP conditioning) the same way, through a linear layer that
    starts at zero, with a learned null embedding for rows without one (classifier-free guidance)."""

    def __init__(self, in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                 attention_resolutions=(16, 8), num_heads=4, dropout=0.0, context_dim=None, sample_size=32,
                 pooled_text_embed=False, image_embed_dim=None):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                           channel_mult=list(channel_mult), num_res_blocks=num_res_blocks,
                           attention_resolutions=list(attention_resolutions), num_heads=num_heads, dropout=dropout,
                           context_dim=context_dim, sample_size=sample_size, pooled_text_embed=pooled_text_embed,
                           image_embed_dim=image_embed_dim)
        if pooled_text_embed and context_dim is None:
            raise ValueError("pooled_text_embed needs a text-conditioned UNet (context_dim)")
        if model_channels % 32:
            raise ValueError(f"model_channels must be a multiple of 32 (GroupNorm groups), got {model_channels}")
        if any(model_channels * m % num_heads for m in channel_mult):
            raise ValueError(f"num_heads {num_heads} must divide every level's width {model_channels} x {channel_mult}")
        self.context_dim = context_dim
        emb_channels = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_channels), nn.SiLU(),
                                        nn.Linear(emb_channels, emb_channels))
        if context_dim is not None:
            self.null_context = nn.Parameter(torch.randn(1, context_dim) / math.sqrt(context_dim))  # 1 token
        self.pooled_text_proj = zero_module(nn.Linear(context_dim, emb_channels)) if pooled_text_embed else None
        self.image_embed_dim = image_embed_dim
        if image_embed_dim is not None:
            self.null_image_embed = nn.Parameter(torch.zeros(image_embed_dim))
            self.image_embed_proj = zero_module(nn.Linear(image_embed_dim, emb_channels))

        def res_and_attn(ch_in, ch_out, resolution):
            layers = [ResBlock(ch_in, ch_out, emb_channels, dropout)]
            if resolution in attention_resolutions:
                layers.append(SpatialTransformer(ch_out, num_heads, context_dim))
            return layers

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.feature_shapes = {}  # stage name -> (channels, size) of its output, for forward(feature_layer=...)
        skip_channels, ch, resolution = [model_channels], model_channels, sample_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(Stage(res_and_attn(ch, model_channels * mult, resolution)))
                ch = model_channels * mult
                skip_channels.append(ch)
                self.feature_shapes[f"down.{len(self.down) - 1}"] = (ch, resolution)
            if level != len(channel_mult) - 1:
                self.down.append(Stage([Downsample(ch)]))
                skip_channels.append(ch)
                resolution //= 2
                self.feature_shapes[f"down.{len(self.down) - 1}"] = (ch, resolution)
        self.middle = Stage([ResBlock(ch, ch, emb_channels, dropout), SpatialTransformer(ch, num_heads, context_dim),
                             ResBlock(ch, ch, emb_channels, dropout)])
        self.feature_shapes["middle"] = (ch, resolution)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = res_and_attn(ch + skip_channels.pop(), model_channels * mult, resolution)
                ch = model_channels * mult
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    resolution *= 2
                self.up.append(Stage(layers))
                self.feature_shapes[f"up.{len(self.up) - 1}"] = (ch, resolution)
        self.norm_out = normalization(ch)
        self.conv_out = zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))

    def drop_context(self, context, context_mask, drop):
        """Rows where `drop` (B bool) is True get the null embedding: one learned token, the rest masked out.
        A missing mask means every token is real."""
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        null = self.null_context.to(context.dtype).expand(context.shape[0], context.shape[1], -1)
        null_mask = torch.zeros_like(context_mask)
        null_mask[:, 0] = True
        context = torch.where(drop[:, None, None], torch.where(null_mask[..., None], null, 0.0), context)
        return context, torch.where(drop[:, None], null_mask, context_mask)

    def drop_image_embed(self, image_embed, drop):
        """Rows where `drop` (B bool) is True get the null image embedding."""
        return torch.where(drop[:, None], self.null_image_embed.to(image_embed.dtype), image_embed)

    def forward(self, x, t, context=None, context_mask=None, feature_layer=None, image_embed=None):
        """The prediction B x C x h x w; with `feature_layer` (a key of feature_shapes: "down.N", "middle" or
        "up.N"), (the prediction, that stage's output B x channels x size x size), for representation alignment.
        image_embed: B x image_embed_dim, or None for the null embedding (ignored by a UNet without one)."""
        if feature_layer is not None and feature_layer not in self.feature_shapes:
            raise ValueError(f"no UNet stage {feature_layer!r} (choose from {', '.join(self.feature_shapes)})")
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config["model_channels"]).to(x.dtype))
        if self.context_dim is not None and context is None:
            context = self.null_context.expand(x.shape[0], 1, -1)  # unconditional: the null token alone
            context_mask = None
        if self.context_dim is None:
            context = context_mask = None
        if self.pooled_text_proj is not None:
            emb = emb + self.pooled_text_proj(mean_token(context, context_mask).to(emb.dtype))
        if self.image_embed_dim is not None:
            if image_embed is None:
                image_embed = self.null_image_embed.expand(x.shape[0], -1)
            emb = emb + self.image_embed_proj(image_embed.to(emb.dtype))
        h = self.conv_in(x)
        skips, feature = [h], None
        for i, stage in enumerate(self.down):
            h = stage(h, emb, context, context_mask)
            skips.append(h)
            feature = h if feature_layer == f"down.{i}" else feature
        h = self.middle(h, emb, context, context_mask)
        feature = h if feature_layer == "middle" else feature
        for i, stage in enumerate(self.up):
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
            feature = h if feature_layer == f"up.{i}" else feature
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out if feature_layer is None else (out, feature)


def complete_config(config):
    """A saved UNet configuration with the constructor's defaults for the options it predates."""
    defaults = {name: param.default for name, param in inspect.signature(UNet).parameters.items()}
    return {**defaults, **config}


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def build_unet(size, **overrides):
    """A UNet of a named size (UNET_CONFIGS), with any constructor argument overridden."""
    if size not in UNET_CONFIGS:
        raise UserError(f"unknown UNet size {size!r} (choose from {', '.join(UNET_CONFIGS)})")
    return UNet(**{**UNET_CONFIGS[size], **overrides})


def main(argv=None):
    parser = ArgumentParser(__file__, description="Print a UNet size's architecture and parameter count.")
    parser.add_argument("--size", default="small", choices=list(UNET_CONFIGS), help="named UNet size")
    parser.add_argument("--context_dim", type=positive_int, default=None,
                        help="text-embedding width of a conditional UNet (384 for all-MiniLM-L6-v2); "
                             "default: unconditional")
    parser.add_argument("--pooled_text_embed", action="store_true",
                        help="a conditional UNet that also adds the mean caption token to the timestep embedding")
    parser.add_argument("--sample_size", type=positive_int, default=32, help="latent height/width")
    parser.add_argument("--in_channels", type=positive_int, default=4, help="latent channels")
    parser.add_argument("--full", action="store_true", help="print every layer, not just the summary")
    args = parser.parse_args(argv)
    if args.pooled_text_embed and args.context_dim is None:
        raise UserError("--pooled_text_embed needs --context_dim (a text-conditioned UNet)")
    with torch.device("meta"):  # shapes only: nothing allocated, instant even for large sizes
        model = build_unet(args.size, context_dim=args.context_dim, sample_size=args.sample_size,
                           in_channels=args.in_channels, out_channels=args.in_channels,
                           pooled_text_embed=args.pooled_text_embed)
    if args.full:
        print(model)
    for name in ("time_embed", "conv_in", "down", "middle", "up", "conv_out"):
        print(f"{name:12s} {count_parameters(getattr(model, name)) / 1e6:8.3f}M")
    print(f"config: {model.config}")
    print(f"UNet {args.size}: {count_parameters(model):,} parameters ({count_parameters(model) / 1e6:.1f}M)")
    return 0


if __name__ == "__main__":
    run_cli(main)
