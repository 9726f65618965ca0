"""VQGAN: paintings <-> small latents (Esser et al. 2021, taming-transformers; the first stage of
Rombach et al. 2022, latent-diffusion).

Parameter names and shapes follow the published checkpoints, so the `vq-f8` model.ckpt of
latent-diffusion loads strictly and can be fine-tuned on art; small configurations train from scratch
on a CPU.

    # the recipe of the shipped models/vqgan by default (RECIPES): first vq-f4-small from scratch at 128 px
    # (2,427 steps of batch 8, ~0.5 steps/s in bf16 on 2 cores), then its decoder sharpened against a GAN
    python vqgan.py --data data/wikiart128 --out runs/vq
    python vqgan.py --finetune_decoder --init_ckpt runs/vq/vqgan --data ../shared/wikiart-mini --out runs/vq-ft
    # convert the published checkpoint, then fine-tune it on art
    python vqgan.py --config vq-f8 --init_ckpt model.ckpt --max_steps 0 --out runs/f8
    python vqgan.py --config vq-f8 --init_ckpt runs/f8/vqgan.safetensors --data art/ --out runs/f8-art --lr 2e-5
    # PSNR / SSIM / codebook usage on held-out images, and an original-vs-reconstruction grid: evaluate.py
    python evaluate.py --vqgan_ckpt runs/vq/vqgan --real ../shared/wikiart-mini --grid runs/vq/eval.png

This file holds the model and its files, then the command that trains or converts one: its loop and its flags. The
pieces of a training step (data, losses' use, codebook upkeep, latent scale) are vqgan_training.py's; the losses
and the discriminator are vqgan_losses.py's.
"""
import argparse
import copy
import hashlib
import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from checkpoints import (
    EXPORT_DTYPES, check_run_identity, checkpoint_path, load_model, load_resume, load_weights, model_paths,
    prune_checkpoints, read_checkpoint_tensors, read_json, save_model, save_state_dir,
)
from cli import (
    ArgumentParser, UserError, int_list, non_negative_float, non_negative_int, positive_float, positive_int, run_cli,
)
from devices import native_bf16, pick_device
from images import ImageSource, ImageTensorDataset, collate_skip_none, make_grid, save_png, tensor_to_images
from training_loop import LogWindow, StopSignal, due, rng_state, seed_everything, set_rng_state, start_log
from vqgan_losses import LossWeights, NLayerDiscriminator, build_perceptual
from vqgan_training import (
    SeededAugmentation, batch_plan, dead_code_patience, fixed_images, learning_rate, load_init, measure_latent_scale,
    restart_dead_codes, train_step, write_log,
)

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
            codebook = self.embedding.weight.float()  # K x C
            distances = z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ codebook.t() + codebook.pow(2).sum(1)
            indices = distances.argmin(dim=1)  # N
            z_q = codebook[indices].view(b, h, w, c).permute(0, 3, 1, 2)
            # codebook term moves codes towards encoder outputs; commitment term (beta) the reverse
            loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
            z_q = z + (z_q - z).detach()
        return z_q, loss, indices.view(b, h, w)


# ----------------------------------------------------------------------------------------------
# The model


NOT_ARCHITECTURE = ("latent_scale", "model", "training")  # the config keys a saved VQGAN adds to CONFIGS[...]'s


class VQModel(nn.Module):
    """encode: images B x 3 x H x W in [-1, 1] -> latents B x embed_dim x H/f x W/f (before quantisation).
    decode: latents -> images (quantised first). Diffusion works on `latents * latent_scale`."""

    def __init__(self, config):
        super().__init__()
        unknown = set(config) - set(CONFIGS["vq-f8"]) - set(NOT_ARCHITECTURE)
        missing = set(CONFIGS["vq-f8"]) - set(config)
        if unknown or missing:
            raise UserError(f"bad VQGAN config: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        self.arch = {k: copy.deepcopy(v) for k, v in config.items() if k not in NOT_ARCHITECTURE}
        self.latent_scale = float(config.get("latent_scale", 1.0))
        c = self.arch
        if c["ch"] % 32 or any((c["ch"] * m) % 32 for m in c["ch_mult"]):
            raise UserError(f"ch * ch_mult must be multiples of 32 (GroupNorm groups): ch {c['ch']}, "
                            f"ch_mult {c['ch_mult']}")
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


def save_vqgan(model, path, dtype=None, training=None):
    """`NAME.safetensors` + `NAME.json` ({"model": "vqgan", architecture, "latent_scale"}, and "training": how it
    was trained, where given; VQGANs saved before they recorded it load alike)."""
    config = {"model": "vqgan", **model.config, **({"training": training} if training is not None else {})}
    return save_model(path, model.state_dict(), config, dtype=dtype)


ENCODER_SIDE = ("encoder", "quant_conv", "quantize")  # the modules an image's latents depend on


def latents_digest(path):
    """sha256 of what a saved VQGAN's latents depend on: its config file (architecture, latent scale; without its
    "training" record, hashed as save_vqgan writes a config without one) and its ENCODER_SIDE tensors, not the
    decoder. A --finetune_decoder'd VQGAN keeps the digest, so latent caches and diffusion runs keyed by it stay
    valid."""
    from safetensors import safe_open

    weights_path, config_path = model_paths(path)
    config_bytes = Path(config_path).read_bytes()
    config = json.loads(config_bytes)
    if "training" in config:  # how it was trained changes with every fine-tune; its latents do not
        config_bytes = json.dumps({k: v for k, v in config.items() if k != "training"}, indent=2,
                                  sort_keys=True).encode()
    digest = hashlib.sha256(config_bytes)
    with safe_open(str(weights_path), "pt") as weights:
        for name in sorted(weights.keys()):
            if name.split(".")[0] in ENCODER_SIDE:
                tensor = weights.get_tensor(name).contiguous()
                digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_vqgan(path, device="cpu"):
    """A VQModel written by save_vqgan, in eval mode with gradients off, in channels-last memory format (its
    convolutions run about 1.4x faster so on CPUs; outputs agree with NCHW to about 1e-5)."""
    tensors, config = load_model(path, "VQGAN")
    if config.get("model") != "vqgan":
        raise UserError(f"{path} is not a VQGAN checkpoint (model: {config.get('model')!r})")
    model = VQModel(config)
    load_weights(model, tensors, f"VQGAN checkpoint {path}")
    return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


def reconstruction_grid(originals, reconstructions, columns=8):
    """Rows of originals, each followed by the row of their reconstructions."""
    originals, reconstructions = tensor_to_images(originals), tensor_to_images(reconstructions)
    columns = min(columns, len(originals))
    blank = [Image.new("RGB", originals[0].size, "white")] * (-len(originals) % columns)  # fills the last rows
    originals, reconstructions = originals + blank, reconstructions + blank
    tiles = []
    for start in range(0, len(originals), columns):
        tiles += originals[start:start + columns] + reconstructions[start:start + columns]
    return make_grid(tiles, ncols=columns)


# ----------------------------------------------------------------------------------------------
# Training: the run's model, optimizers and loop (its data, step and log line are vqgan_training.py's)


CONFIG_OVERRIDES = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim", "n_embed",
                    "dropout", "beta")


def build_config(name, overrides=None, resolution=None):
    """CONFIGS[name] with `overrides` (a dict of CONFIG_OVERRIDES) and, where given, the training `resolution` (from
    scratch, attention resolutions refer to the training image size; a checkpoint keeps its own)."""
    if name not in CONFIGS:
        raise UserError(f"unknown --config {name!r} (choose {', '.join(CONFIGS)})")
    config = {**copy.deepcopy(CONFIGS[name]), **(overrides or {})}
    if resolution is not None:
        config["resolution"] = resolution
    return config


def initial_model(state, config, finetune_ckpt=None):
    """The model to train: a resumed run's architecture (`state`); with --finetune_decoder the checkpoint
    `finetune_ckpt`'s own config, latent scale included (the latents must not change); else `config`."""
    if state:
        return VQModel(state["config"])
    if finetune_ckpt:
        return VQModel(read_json(model_paths(finetune_ckpt)[1], "--init_ckpt config"))
    return VQModel(config)


def freeze_encoder_side(model):
    """--finetune_decoder: the encoder, quant_conv and codebook stop learning, so every image keeps its
    latents and code indices (diffusion models trained on them stay valid); post_quant_conv and the
    decoder train. Returns the parameters that still learn."""
    for name in ENCODER_SIDE:
        getattr(model, name).requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def export(model, out, export_dtype, training, latent_scale=None):
    """out/vqgan.safetensors + out/vqgan.json, weights stored as `export_dtype` ("fp32", "fp16" or "bf16"), the
    config recording `training` (how the model was trained). `latent_scale`, where given, replaces the model's."""
    if latent_scale is not None:
        model.latent_scale = latent_scale
    return save_vqgan(model, out / "vqgan", dtype=EXPORT_DTYPES[export_dtype], training=training)


def train(args, device):
    from tqdm import tqdm

    bf16 = args.bf16
    out = Path(args.out)
    checkpoints = out / "checkpoints"
    # out/state: the single state folder of runs before step folders, resumed as the oldest checkpoint
    resume_from, state = load_resume(args.resume, checkpoints, "choose another --out", legacy=[out / "state"])
    identity = run_identity(args)
    if state:
        check_run_identity(state.get("identity"), identity, resume_from, "start a new --out")
    seed_everything(args.seed)
    model = initial_model(state, model_config(args), args.init_ckpt if args.finetune_decoder else None)
    disc = NLayerDiscriminator(n_layers=args.disc_layers)
    needs_init = args.init_ckpt and (not state or args.perceptual == "lpips-vgg")  # LPIPS weights may live in it
    init_tensors = read_checkpoint_tensors(args.init_ckpt, args.trust_checkpoint) if needs_init else {}
    if init_tensors and not state:
        disc_loaded = load_init(model, disc, init_tensors, args.init_ckpt)
        disc_note = "loaded" if disc_loaded else "not in it or other shapes: fresh"
        print(f"loaded {args.init_ckpt} (discriminator {disc_note})")
    resolution = args.resolution or model.config["resolution"]
    if resolution % model.downsample_factor:
        raise UserError(f"--resolution {resolution} is not a multiple of the downsampling factor "
                        f"{model.downsample_factor}")
    source = ImageSource(args.data, args.split or "train", args.image_column) if args.data else None

    def write_export(step):  # the latent scale is measured on the data, or kept by --finetune_decoder
        scale = None
        if source is not None and not args.finetune_decoder:
            scale = measure_latent_scale(model, source, resolution, args.scale_images, args.batch_size, device)
        return export(model, out, args.export_dtype, {"step": step, "args": vars(args)}, scale)

    if args.max_steps == 0:  # conversion / export only
        path = write_export(0)
        print(f"wrote {path} (latent scale {model.latent_scale:.4f}{'' if source else ', not measured: no --data'})")
        return 0
    if source is None:
        raise UserError("training needs --data")

    perceptual = build_perceptual(args.perceptual, init_tensors, args.perceptual_weights, args.trust_checkpoint)
    model.to(device).train()
    disc.to(device).train()
    if perceptual is not None:
        perceptual.to(device)
    trainable = freeze_encoder_side(model) if args.finetune_decoder else list(model.parameters())
    opt_ae = torch.optim.Adam(trainable, lr=args.lr, betas=(0.5, 0.9))
    opt_disc = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    # Step each code was last picked at. From scratch every code starts "dead", so the first batch
    # initialises the codebook from encoder outputs; fine-tuning keeps the given codebook.
    patience = args.dead_code_steps
    last_used = torch.full((model.config["n_embed"],), -patience if not args.init_ckpt else 0, dtype=torch.long)
    step = 0
    if state:
        load_weights(model, state["model"], f"training state {resume_from}")
        load_weights(disc, state["disc"], f"discriminator in {resume_from}")
        opt_ae.load_state_dict(state["opt_ae"])
        opt_disc.load_state_dict(state["opt_disc"])
        step, last_used = state["step"], state["last_used"]
        set_rng_state(state["rng"])
        print(f"resumed from {resume_from} at step {step}")
    last_used = last_used.to(device)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    start_log(log_path, step if state else 0)

    dataset = SeededAugmentation(ImageTensorDataset(source, resolution))
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_plan(len(source), args.batch_size, args.seed, step, args.max_steps),
        collate_fn=collate_skip_none, num_workers=args.num_workers, generator=torch.Generator(),
    )
    preview = fixed_images(source, resolution, 8).to(device)
    window = LogWindow()
    codes = {"used": torch.zeros(model.config["n_embed"], device=device), "restarted": 0, "skipped": 0}
    weights = loss_weights(args)
    print(f"training on {device}{' in bf16 autocast' if bf16 else ''}")
    bar = tqdm(total=args.max_steps, initial=step, desc="vqgan", dynamic_ncols=True)
    with StopSignal() as stop:
        for step, images in enumerate(loader, start=step):
            rate = learning_rate(step, args.lr, args.lr_drop_step, args.lr_drop_factor)  # on resume, today's --lr
            for group in opt_ae.param_groups + opt_disc.param_groups:
                group["lr"] = rate
            if images is not None:
                codes["skipped"] += args.batch_size - len(images)
                metrics, indices, latents = train_step(model, disc, perceptual, opt_ae, opt_disc, images.to(device),
                                                       step, weights, device, bf16)
                window.add(metrics)
                codes["used"] += torch.bincount(indices.flatten(), minlength=len(codes["used"]))
                last_used[indices.unique()] = step
                if patience:
                    codes["restarted"] += restart_dead_codes(model.quantize.embedding.weight, last_used, latents,
                                                              step, patience)
            else:
                codes["skipped"] += args.batch_size
            done = step + 1
            bar.update(1)
            stopping = stop.name is not None
            if due(done, args.log_every, args.max_steps, stopping):
                write_log(log_path, done, window, codes, bar)
            if due(done, args.ckpt_every, args.max_steps, stopping):
                with window.paused():  # keep steps/s about training
                    state_path = checkpoint_path(checkpoints, done)
                    save_state_dir(state_path, {
                        "config": model.config, "model": model.state_dict(), "disc": disc.state_dict(),
                        "opt_ae": opt_ae.state_dict(), "opt_disc": opt_disc.state_dict(), "step": done,
                        "last_used": last_used.cpu(), "rng": rng_state(), "args": vars(args), "identity": identity,
                    })
                    prune_checkpoints(checkpoints, args.keep_last)
                    shutil.rmtree(out / "state", ignore_errors=True)  # a pre-step-folder state, now superseded
                    save_preview(out / "samples" / f"step_{done:07d}.png", model, preview, done)
                    path = write_export(done)
                    bar.write(f"step {done}: saved {state_path} and {path} (latent scale {model.latent_scale:.4f})")
            if stopping:
                bar.write(f"stopped by {stop.name} after step {done}; continue with --resume auto")
                break
    bar.close()
    return 0


@torch.no_grad()
def save_preview(path, model, preview, step):
    model.eval()
    grid = reconstruction_grid(preview, model(preview)[0].float())
    model.train()
    save_png(path, grid, {"step": step})


# ----------------------------------------------------------------------------------------------
# Command line: parse_args resolves every default once (a new Namespace, never changed later); the functions after
# resolve_defaults read the parsed flags into the explicit arguments the helpers above take. Above this line only
# train, the command's body, sees `args`.

# The recipes that made models/vqgan (docs/models.md, docs/decoder-finetune.md), each stage's defaults; flags given
# override them. "first stage": vq-f4-small from scratch at 128 px, batch 8, L1 + perceptual + codebook loss and no
# GAN, 2,427 steps at lr 4e-4, 1e-4 from step 1,653 (the shipped run was stopped there and resumed at 1e-4; its
# perceptual network was EfficientNet-Lite0, which evaluate.py now keeps as its judge, so --perceptual effnet is
# Lite2 today). "--finetune_decoder": the shipped decoder's last round, 300 steps against a discriminator held back
# by R1, started from the round before it (--disc_weight 0.1 --disc_r1 0, 500 steps planned, stopped at 337).
RECIPES = {
    "first stage": dict(max_steps=2427, lr=4e-4, lr_drop_step=1653, disc_start=None, disc_warmup=0, disc_weight=0.6,
                        disc_r1=0.0),
    "--finetune_decoder": dict(max_steps=300, lr=5e-5, lr_drop_step=None, disc_start=0, disc_warmup=50,
                               disc_weight=0.3, disc_r1=1e-5),
}


def recipe_defaults(name):
    """'default: X (first stage), Y (--finetune_decoder)': what -h says of a flag whose default is the stage's."""
    shown = ["never" if recipe[name] is None else f"{recipe[name]:g}" for recipe in RECIPES.values()]
    return "default: " + ", ".join(f"{value} ({stage})" for value, stage in zip(shown, RECIPES))


def step_or_never(text):
    """An argparse type: a step (an integer >= 0), or 'never' (None)."""
    return None if text == "never" else non_negative_int(text)


def resolve_defaults(given):
    """The settings of a run (a Namespace): the flags `given` (name -> value; a flag left out whose default is its
    stage's is absent, argparse.SUPPRESS) over its stage's RECIPES entry, then the defaults that follow from other
    flags: fp16 exports from training (as shipped), fp32 from a conversion (the weights as published), a
    perceptual weight per network and the dead-code patience (dead_code_patience)."""
    settings = {**RECIPES["--finetune_decoder" if given["finetune_decoder"] else "first stage"], **given}
    settings.setdefault("export_dtype", "fp16" if settings["max_steps"] else "fp32")
    settings.setdefault("perceptual_weight", 0.1 if settings["perceptual"] == "effnet" else 1.0)
    settings["dead_code_steps"] = dead_code_patience(settings["dead_code_steps"], settings["init_ckpt"],
                                                     settings["finetune_decoder"])
    return argparse.Namespace(**settings)


def with_device_defaults(args, device):
    """A copy of `args` with the defaults that depend on the device filled in: --bf16 where bf16 pays."""
    return argparse.Namespace(**{**vars(args), "bf16": native_bf16(device) if args.bf16 is None else args.bf16})


def model_config(args):
    """The architecture of --config with the command line's overrides (and --resolution, from scratch)."""
    overrides = {key: getattr(args, key) for key in CONFIG_OVERRIDES if getattr(args, key) is not None}
    return build_config(args.config, overrides, None if args.init_ckpt else args.resolution)


def loss_weights(args):
    return LossWeights(args.perceptual_weight, args.codebook_weight, args.disc_weight, args.disc_start,
                       args.disc_warmup, args.disc_r1)


def run_identity(args):
    """The settings that give a training state its meaning (flag name -> value): --resume refuses a state saved
    under others. The architecture is --config with its overrides (with --finetune_decoder, --init_ckpt's, fixed
    by the state itself); --lr, --max_steps, intervals, --bf16, ... may change on resume."""
    architecture = {}
    if not args.finetune_decoder:
        architecture = dict(config=args.config, **{k: v for k, v in model_config(args).items() if k != "resolution"})
    resolution = args.resolution or (None if args.finetune_decoder else model_config(args)["resolution"])
    return dict(**architecture, resolution=resolution, finetune_decoder=args.finetune_decoder, seed=args.seed,
                batch_size=args.batch_size, perceptual=args.perceptual, perceptual_weight=args.perceptual_weight,
                codebook_weight=args.codebook_weight, disc_start=args.disc_start, disc_warmup=args.disc_warmup,
                disc_weight=args.disc_weight, disc_layers=args.disc_layers, disc_r1=args.disc_r1,
                dead_code_steps=args.dead_code_steps)



def parse_args(argv=None):
    p = ArgumentParser(
        __file__,
        description="Train, fine-tune or convert a VQGAN (taming-transformers / LDM first stage); "
                    "evaluate.py --vqgan_ckpt evaluates one.")
    g = p.add_argument_group("model")
    g.add_argument("--config", default="vq-f4-small", help=f"named architecture: {', '.join(CONFIGS)}")
    g.add_argument("--ch", type=positive_int, help="override: base channels (multiple of 32)")
    g.add_argument("--ch_mult", type=int_list, help="override: channel multipliers per resolution, e.g. 1,2,2")
    g.add_argument("--num_res_blocks", type=positive_int, help="override: ResNet blocks per encoder resolution")
    g.add_argument("--attn_resolutions", type=int_list,
                   help="override: resolutions with attention ('' = mid block only)")
    g.add_argument("--z_channels", type=positive_int, help="override: encoder output channels")
    g.add_argument("--embed_dim", type=positive_int, help="override: codebook vector size = latent channels")
    g.add_argument("--n_embed", type=positive_int, help="override: codebook size")
    g.add_argument("--dropout", type=float, help="override: dropout in ResNet blocks")
    g.add_argument("--beta", type=float, help="override: commitment loss weight")
    g.add_argument("--init_ckpt",
                   help="start from these weights: a published model.ckpt (Lightning) or our .safetensors")
    g.add_argument("--trust_checkpoint", action="store_true",
                   help="allow arbitrary unpickling of .ckpt/.pt files (only for files you trust)")
    g = p.add_argument_group("data")
    g.add_argument("--data",
                   help="ImageFolder (as download_hf.py writes), image folder, or Hugging Face dataset name/path")
    g.add_argument("--split", help="dataset split (default: train)")
    g.add_argument("--image_column", default="image", help="image column of a Hugging Face dataset")
    g.add_argument("--resolution", type=positive_int,
                   help="image size: resize + random crop (default: the config's resolution)")
    g.add_argument("--num_workers", type=non_negative_int, default=0,
                   help="data-loading worker processes (raise it on a GPU)")
    g = p.add_argument_group("training")
    g.add_argument("--out", help="output folder: checkpoints/step_NNNNNNN/ (resumable), vqgan.safetensors+json, "
                   "log.jsonl, samples/")
    g.add_argument("--resume", help="'auto' (the newest intact checkpoint in OUT, if any) or a checkpoint folder")
    g.add_argument("--max_steps", type=non_negative_int, default=argparse.SUPPRESS,
                   help="training steps (0 with --init_ckpt: convert only); " + recipe_defaults("max_steps"))
    g.add_argument("--batch_size", type=positive_int, default=8, help="images per step")
    g.add_argument("--lr", type=positive_float, default=argparse.SUPPRESS,
                   help="Adam learning rate of autoencoder and discriminator (fine-tuning vq-f8 wants ~2e-5); with "
                   "--resume it replaces the saved rate; " + recipe_defaults("lr"))
    g.add_argument("--lr_drop_step", type=step_or_never, default=argparse.SUPPRESS,
                   help="from this step on, train at --lr times --lr_drop_factor ('never': constant); "
                   + recipe_defaults("lr_drop_step"))
    g.add_argument("--lr_drop_factor", type=positive_float, default=0.25,
                   help="the learning rate's factor from --lr_drop_step on (the first stage's 4e-4 -> 1e-4)")
    g.add_argument("--perceptual", default="effnet", choices=["lpips-vgg", "effnet", "none"],
                   help="perceptual loss network")
    g.add_argument("--perceptual_weights",
                   help="LPIPS-VGG weights file (state dict, linear layers only, or an LDM .ckpt)")
    g.add_argument("--perceptual_weight", type=float, default=argparse.SUPPRESS,
                   help="weight of the perceptual loss (default 1.0 for lpips-vgg as in taming; 0.1 for effnet, whose "
                   "distance sums six stages and runs ~10x larger)")
    g.add_argument("--codebook_weight", type=float, default=1.0, help="weight of the codebook + commitment loss")
    g.add_argument("--disc_start", type=step_or_never, default=argparse.SUPPRESS,
                   help="step at which the discriminator starts to train ('never': no GAN); "
                   + recipe_defaults("disc_start"))
    g.add_argument("--disc_warmup", type=non_negative_int, default=argparse.SUPPRESS,
                   help="steps the discriminator trains alone (from --disc_start) before its loss reaches the "
                   "generator; " + recipe_defaults("disc_warmup"))
    g.add_argument("--finetune_decoder", action="store_true", help="train only post_quant_conv and the decoder of "
                   "--init_ckpt (one of our VQGANs): encoder, quant_conv and codebook stay frozen bit for bit, so "
                   "latents and diffusion models trained on them stay valid; the latent scale is kept; its defaults "
                   "are the shipped decoder's last round")
    g.add_argument("--disc_weight", type=float, default=argparse.SUPPRESS,
                   help="GAN loss weight (times the adaptive weight); " + recipe_defaults("disc_weight"))
    g.add_argument("--disc_r1", type=non_negative_float, default=argparse.SUPPRESS,
                   help="R1 penalty weight gamma: the discriminator's loss gains gamma / 2 * E|grad_x D(real)|^2 "
                        "(Mescheder et al. 2018), which keeps it from overpowering the decoder (0 = off); "
                        + recipe_defaults("disc_r1"))
    g.add_argument("--disc_layers", type=positive_int, default=2,
                   help="PatchGAN discriminator layers (2 matches vq-f8)")
    g.add_argument("--dead_code_steps", type=non_negative_int, help="restart codes unused this many steps (0 = never; "
                   "default 20 from scratch, 0 with --init_ckpt)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast; default: on where bf16 pays (CUDA; CPUs with AVX512-BF16/AMX whose bf16 "
                   "matmul measures >= 1.3x faster than fp32), off elsewhere")
    g.add_argument("--log_every", type=positive_int, default=50, help="steps between log.jsonl lines")
    g.add_argument("--ckpt_every", type=positive_int, default=500,
                   help="steps between checkpoints, preview grids and exports")
    g.add_argument("--keep_last", type=positive_int, default=2, help="checkpoints kept")
    g.add_argument("--scale_images", type=positive_int, default=256,
                   help="images used to measure the latent scale at export")
    g.add_argument("--export_dtype", default=argparse.SUPPRESS, choices=list(EXPORT_DTYPES),
                   help="storage dtype of exported weights; default: fp16 (as shipped), fp32 with --max_steps 0 (a "
                   "conversion keeps the weights exact)")
    g.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, init)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = resolve_defaults(vars(p.parse_args(argv)))
    if not args.out:
        raise UserError("training and conversion need --out")
    if args.finetune_decoder and not args.init_ckpt:
        raise UserError("--finetune_decoder needs --init_ckpt: the VQGAN whose decoder to fine-tune")
    if args.max_steps == 0 and not args.init_ckpt:
        raise UserError("--max_steps 0 converts a checkpoint: it needs --init_ckpt")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    return train(with_device_defaults(args, device), device)


if __name__ == "__main__":
    run_cli(main)
