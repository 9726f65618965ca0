"""One optimizer step of the UNet and what it is built from: the UNet of a size and its overrides (make_unet), a
warm start from a diffusion checkpoint (--init_from), RunState (UNet, DDP wrapper, EMA, AdamW, LR scheduler, noise
schedule), the loss of a micro-batch (min-SNR weighting, caption and image-embedding drops for classifier-free
guidance, REPA's projector and alignment loss) and train_step. trainer.py's loop drives it.
"""
import contextlib
import copy
import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from checkpoints import load_weights
from cli import UserError
from devices import autocast
from diffusion import read_diffusion_model, unet_weights
from distributed import mean_over_ranks
from schedule import NoiseSchedule
from training_loop import ema_decay, update_ema
from unet import UNET_CONFIGS, build_unet, zero_module

UNET_OVERRIDES = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads", "dropout")


# ----------------------------------------------------------------------------------------------
# Representation alignment (REPA, Yu et al. 2024): the training side. A UNet stage, through a small convolutional
# projector, is pulled towards the frozen teacher's targets that latent_cache.py computes once.


class RepaProjector(nn.Module):
    """UNet stage output B x C x h x w -> B x K x g x g: two 3x3 convolutions (a convolutional projector keeps
    spatial structure; Singh et al. 2025, iREPA), then resized to the target grid (area mean down, bilinear up)."""

    def __init__(self, in_channels, out_channels, grid):
        super().__init__()
        hidden = max(in_channels, out_channels)
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(hidden, out_channels, 3, padding=1))
        self.grid = grid

    def forward(self, features):
        x = self.net(features)
        if x.shape[-1] > self.grid:
            return F.adaptive_avg_pool2d(x, self.grid)
        return F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)


def spatially_normalised(targets):
    """iREPA's per-image spatial normalisation of the targets: y <- (y - mean_hw y) / std_hw y per image and
    channel, so the alignment transfers where things are rather than the global mean feature."""
    mean = targets.mean(dim=(2, 3), keepdim=True)
    return (targets - mean) / (targets.std(dim=(2, 3), keepdim=True) + 1e-6)


def repa_loss(projected, targets):
    """REPA's alignment loss: -1/(B g^2) sum over images and positions of cos(projected, normalised target)."""
    return -F.cosine_similarity(projected.float(), spatially_normalised(targets.float()), dim=1).mean()


# ----------------------------------------------------------------------------------------------
# Model, optimizer, EMA


def make_unet(unet_size, latent_channels, latent_size, context_dim, overrides=None, pooled_text_embed=False,
              image_embed_dim=None):
    """The UNet of size `unet_size` (UNET_CONFIGS) with `overrides` (a dict of UNET_OVERRIDES), for latents
    C x h x h."""
    overrides = overrides or {}
    channel_mult = overrides.get("channel_mult", UNET_CONFIGS[unet_size]["channel_mult"])
    if latent_size % 2 ** (len(channel_mult) - 1):
        raise UserError(f"latents of {latent_size}x{latent_size} cannot be halved {len(channel_mult) - 1} times by "
                        f"the UNet (channel_mult {channel_mult}): change --resolution or --channel_mult")
    try:
        return build_unet(unet_size, **overrides, in_channels=latent_channels, out_channels=latent_channels,
                          sample_size=latent_size, context_dim=context_dim, pooled_text_embed=pooled_text_embed,
                          image_embed_dim=image_embed_dim)
    except ValueError as err:
        raise UserError(f"bad UNet configuration: {err}") from None


def init_from_checkpoint(unet, path):
    """Copy the UNet weights of a diffusion checkpoint (EMA where it has them) into a fresh `unet` (--init_from):
    fine-tuning, or a conditional model grown from an unconditional one. Every checkpoint tensor must fit one of
    `unet` by name and shape; those only `unet` has (the cross-attention, null embedding and pooled text projection
    of a conditional model) keep their initialisation, but each new cross-attention starts with a zero output
    projection (as the pooled text projection always does), so the UNet starts out computing what the checkpoint
    did. Returns (the names of the new tensors, the optimizer steps the checkpoint's model was trained for: its
    config's total_steps, or at least its last run's steps for a checkpoint that predates the count)."""
    tensors, config = read_diffusion_model(path)
    weights, _ = unet_weights(tensors, path)
    new = load_weights(unet, weights, f"--init_from {path} (pass its --unet_size, overrides and VQGAN)",
                       allow_missing=True)
    for name, module in unet.named_modules():
        if name.endswith("cross_attn") and f"{name}.to_out.weight" in new:
            zero_module(module.to_out)
    training = config.get("training") or {}
    return new, max(1, int(training.get("total_steps") or training.get("step") or 0))


@dataclasses.dataclass
class RunState:
    """What a training step reads and changes: the UNet, `model` (the UNet, or its DDP wrapper under torchrun),
    its EMA copy (eval mode; what sampling uses), AdamW, the LR scheduler, the noise schedule, the device, the
    number of optimizer steps taken, those its --init_from model had taken before (0 for fresh weights; the EMA
    does not warm up after a trained model) and the REPA projector (None without REPA)."""
    unet: torch.nn.Module
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: NoiseSchedule
    device: torch.device
    step: int = 0
    steps_before: int = 0
    projector: torch.nn.Module | None = None  # REPA's, training-only

    def trained_parameters(self):
        return trained_parameters(self.unet, self.projector)


def trained_parameters(unet, projector=None):
    """The UNet's parameters, then the REPA projector's (if any): what AdamW updates and clipping bounds."""
    return list(unet.parameters()) + (list(projector.parameters()) if projector else [])


def make_projector(unet, layer, repa_shape, seed):
    """The REPA projector from the UNet stage `layer` onto targets K x g x g, initialised from `seed` alone (the
    same on every process) without moving the global random stream."""
    channels, grid = repa_shape[0], repa_shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RepaProjector(unet.feature_shapes[layer][0], channels, grid)


def check_repa_layer(layer, unet):
    if layer not in unet.feature_shapes:
        raise UserError(f"--repa_layer {layer}: no such UNet stage (choose from {', '.join(unet.feature_shapes)})")


def parameter_groups(trained, weight_decay, lr, embed_params=(), embed_lr_scale=1.0):
    """AdamW's parameter groups: `weight_decay` on matrices and convolutions only; `embed_params` (the image-embedding
    projection) at `embed_lr_scale` times `lr` in groups of their own when the scale is not 1."""
    embed_ids = {id(p) for p in embed_params} if embed_lr_scale != 1 else set()
    groups = []
    for scale, members in ((1.0, [p for p in trained if id(p) not in embed_ids]),
                           (embed_lr_scale, [p for p in trained if id(p) in embed_ids])):
        for decay, params in ((weight_decay, [p for p in members if p.dim() >= 2]),
                              (0.0, [p for p in members if p.dim() < 2])):
            if params:
                groups.append({"params": params, "weight_decay": decay, "lr": lr * scale})
    return groups


def build_training(unet, device, schedule, lr, lr_multiplier, weight_decay=0.0, channels_last=False, projector=None,
                   embed_lr_scale=1.0):
    """Everything a training step changes: the UNet (and its DDP wrapper `model` under torchrun), its EMA copy
    (in eval mode, what sampling uses), the REPA `projector` (None: no REPA), AdamW at peak `lr` (`weight_decay` on
    matrices and convolutions only; the image-embedding projection at `embed_lr_scale` x `lr`), the LR schedule
    (`lr_multiplier`: step -> factor of each group's peak), the noise `schedule` and the optimizer step count."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    unet = unet.to(device, memory_format=layout).train()  # the batches follow the weights' layout
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    projector = None if projector is None else projector.to(device).train()
    model = unet
    if dist.is_initialized():
        model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    embed_params = list(unet.image_embed_proj.parameters()) + [unet.null_image_embed] if unet.image_embed_dim else []
    groups = parameter_groups(trained_parameters(unet, projector), weight_decay, lr, embed_params, embed_lr_scale)
    # fused: one kernel for all parameters; on CPU far faster than the per-parameter loop (bench.py, train section)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier)
    return RunState(unet=unet, model=model, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler,
                    schedule=schedule, device=device, projector=projector)


def diffusion_loss(run, latents, context, context_mask, prediction_type="epsilon", min_snr_gamma=None,
                   cond_drop=0.0, timestep_sampling="uniform", timestep_loc=None, timestep_scale=None,
                   repa_layer="middle", repa_targets=None, image_embeds=None):
    """(The DDPM loss of one micro-batch of scaled latents B x C x h x w (NoiseSchedule.training_loss), the REPA
    loss or None). Timesteps come from NoiseSchedule.training_timesteps(timestep_sampling, loc, scale); captions
    B x L x D are swapped for the null embedding with probability `cond_drop` (classifier-free guidance training).
    With `repa_targets` (B x K x g x g) the same forward pass also returns stage `repa_layer`, which the projector
    aligns with them. Image embeddings B x E (or None) are swapped for the null embedding with the same
    probability, drawn apart from the captions'."""
    if context is not None:
        drop = torch.rand(latents.shape[0], device=latents.device) < cond_drop
        context, context_mask = run.unet.drop_context(context, context_mask, drop)
    if image_embeds is not None:
        image_embeds = run.unet.drop_image_embed(image_embeds, torch.rand(len(latents), device=latents.device)
                                                 < cond_drop)
    t = run.schedule.training_timesteps(latents.shape[0], timestep_sampling, timestep_loc, timestep_scale,
                                        latents.device)
    stage = {}

    def model_fn(x_t, t):
        if repa_targets is None:
            return run.model(x_t, t, context, context_mask, image_embed=image_embeds)
        prediction, stage["features"] = run.model(x_t, t, context, context_mask, feature_layer=repa_layer,
                                                  image_embed=image_embeds)
        return prediction

    loss = run.schedule.training_loss(model_fn, latents, prediction_type, min_snr_gamma, t=t)
    if repa_targets is None:
        return loss, None
    return loss, repa_loss(run.projector(stage["features"]), repa_targets)


def repa_active(run, repa_until):
    """REPA is on from the start until `repa_until` steps (None: always; alignment helps early, can hurt late)."""
    return run.projector is not None and (repa_until is None or run.step < repa_until)


def average_over_ranks(module):
    """Average the gradients of a module that DDP does not wrap (the REPA projector) across processes."""
    if dist.is_initialized():
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


def train_step(run, micro_batches, loss_settings, bf16=False, grad_clip=0.0, max_ema_decay=0.9999, repa_weight=0.0,
               repa_until=None):
    """One optimizer step over micro-batches [(latents, context, mask, REPA targets)] (gradient accumulation;
    under DDP the gradients are averaged across processes on the last one): bf16 autocast, the DDPM loss plus
    `repa_weight` times the REPA loss while REPA is on (repa_active), clipping to `grad_clip` (0 = off), AdamW,
    LR schedule, EMA (ema_decay up to `max_ema_decay`); `loss_settings` are diffusion_loss's keywords. Returns
    (DDPM loss averaged over micro-batches and processes, gradient norm before clipping, REPA loss likewise or
    None). A non-finite loss or gradient norm changes nothing and is returned as it is, for the caller to stop on."""
    total, repa_total = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    aligning = repa_active(run, repa_until)
    for i, (latents, context, context_mask, targets, embeds) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or run.model is run.unet else run.model.no_sync()
        with sync:
            with autocast(run.device, bf16):
                loss, alignment = diffusion_loss(run, latents, context, context_mask, **loss_settings,
                                                 repa_targets=targets if aligning else None, image_embeds=embeds)
            objective = loss if alignment is None else loss + repa_weight * alignment
            (objective / len(micro_batches)).backward()
        total += loss.detach()
        repa_total += 0.0 if alignment is None else alignment.detach()
    if aligning:
        average_over_ranks(run.projector)
    loss = mean_over_ranks(total / len(micro_batches))
    repa = mean_over_ranks(repa_total / len(micro_batches)) if aligning else None
    grad_norm = math.nan
    if math.isfinite(loss) and (repa is None or math.isfinite(repa)):
        grad_norm = torch.nn.utils.clip_grad_norm_(run.trained_parameters(), grad_clip or math.inf).item()
    if not math.isfinite(grad_norm):
        run.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, repa
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.lr_scheduler.step()
    update_ema(run.ema, run.unet, ema_decay(run.step, max_ema_decay, warm_start=run.steps_before > 0))
    run.step += 1
    return loss, grad_norm, repa
