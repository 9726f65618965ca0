"""Diffusion: noise schedules, the training loss, samplers, classifier-free guidance, the checkpoint format and
the sampling command.

Notation (Ho et al. 2020): alpha_bar = prod(1 - beta) over the first t+1 steps; x_t = sqrt(alpha_bar) x0 +
sqrt(1 - alpha_bar) eps. A model predicts eps or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans &
Ho 2022). Samplers (k-diffusion style) take a `denoiser(x_t, t) -> x0` and a descending list of timesteps, and
step to alpha_bar = 1 (clean) after the last one.

    python diffusion.py --unet_ckpt_path runs/unet/unet --num_images 16 --sampler dpmpp-2m --steps 20
    python diffusion.py --prompt "an Impressionism painting of a harbour" --guidance_scale 5
    python diffusion.py --init_image photo.png --strength 0.6     # img2img (SDEdit)
    python diffusion.py --interpolate --num_images 8              # slerp from the noise of --seed to --seed + 1
"""
import argparse
import math
import os
import re
import shlex
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import trange

from cli import ArgumentParser, UserError, check_output_folder, non_negative_float, positive_int, run_cli
from checkpoints import EXPORT_DTYPES, load_model, load_weights, model_paths, save_model
from images import GRID_NAME, image_to_tensor, make_grid, save_png, tensor_to_images
from devices import autocast, native_bf16, pick_device
from unet import UNet
from vqgan import VQModel, load_vqgan

PREDICTION_TYPES = ("epsilon", "v")
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}  # DDPM; latent diffusion
BUNDLED_MODELS = Path(__file__).resolve().parent / "models"

# ----------------------------------------------------------------------------------------------
# Noise schedules


def make_betas(kind, num_train_timesteps, beta_start=None, beta_end=None):
    """betas (float64, length T) of a named schedule:
    linear (Ho et al. 2020):               beta_t = linspace(beta_start, beta_end)
    scaled_linear (Rombach et al. 2022):   beta_t = linspace(sqrt(beta_start), sqrt(beta_end)) ** 2
    cosine (Nichol & Dhariwal 2021):       alpha_bar(t) = cos((t/T + s) / (1 + s) * pi/2) ** 2, s = 0.008,
                                           beta_t = min(1 - alpha_bar(t+1) / alpha_bar(t), 0.999)
    beta_start and beta_end (linear kinds only; None = the kind's default) must lie in (0, 1)."""
    T = num_train_timesteps
    if kind == "cosine":
        s = 0.008
        alpha_bar = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if kind not in DEFAULT_BETAS:
        raise UserError(f"unknown noise schedule {kind!r} (choose linear, scaled_linear or cosine)")
    start, end = beta_range(kind, beta_start, beta_end)
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2


def beta_range(kind, beta_start=None, beta_end=None):
    """(beta_start, beta_end) of a linear kind: the given values (0.0 included), the kind's defaults for None.
    A beta outside (0, 1) is a UserError here: later it would be a NaN in alpha_bar or the loss."""
    start = DEFAULT_BETAS[kind][0] if beta_start is None else beta_start
    end = DEFAULT_BETAS[kind][1] if beta_end is None else beta_end
    for name, value in (("beta_start", start), ("beta_end", end)):
        if not 0 < value < 1:
            raise UserError(f"{name} must be in (0, 1), got {value}")
    return start, end


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so it ends at exactly 0 (the last training
    step sees pure noise, as sampling starts from) with its first value unchanged."""
    sqrt_alpha_bar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_alpha_bar[0].item(), sqrt_alpha_bar[-1].item()
    alpha_bar = ((sqrt_alpha_bar - last) * first / (first - last)) ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


# Training timesteps: the distribution of the log-SNR, lambda = log(alpha_bar / (1 - alpha_bar)), the loss sees.
# name -> default (loc, scale) of sample_log_snr; "uniform" is the DDPM default, t ~ U{0..T-1}.
TIMESTEP_SAMPLINGS = {"uniform": None, "logit-normal": (0.0, 1.0), "laplace": (0.0, 0.5)}


def sample_log_snr(kind, n, loc, scale):
    """n log-SNRs (float64) from the global torch RNG:
    logit-normal (Esser et al. 2024, SD3, Sec. 3.1): the rectified-flow noise level t = sigmoid(u),
        u ~ N(loc, scale^2), density 1 / (scale sqrt(2 pi)) / (t (1 - t)) exp(-(logit(t) - loc)^2 / (2 scale^2));
        its SNR is ((1 - t) / t)^2, so lambda = -2 u ~ N(-2 loc, (2 scale)^2);
    laplace (Hang et al. 2024, "Improved noise schedule for diffusion training"): lambda ~ Laplace(loc, scale),
        p(lambda) = exp(-|lambda - loc| / scale) / (2 scale), drawn through its inverse CDF:
        lambda = loc - scale sgn(a - 1/2) log(1 - 2 |a - 1/2|), a ~ U(0, 1)."""
    if kind == "logit-normal":
        return -2 * (loc + scale * torch.randn(n, dtype=torch.float64))
    if kind == "laplace":
        a = torch.rand(n, dtype=torch.float64) - 0.5
        return loc - scale * a.sign() * torch.log1p(-2 * a.abs())
    raise UserError(f"unknown timestep sampling {kind!r} (choose {', '.join(TIMESTEP_SAMPLINGS)})")


class NoiseSchedule:
    """The forward process q(x_t | x0) over T discrete steps: betas and alphas_cumprod (= alpha_bar), float64."""

    def __init__(self, kind="linear", num_train_timesteps=1000, beta_start=None, beta_end=None,
                 zero_terminal_snr=False):
        self.config = dict(kind=kind, num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                           beta_end=beta_end, zero_terminal_snr=zero_terminal_snr)
        self.num_train_timesteps = num_train_timesteps
        self.betas = make_betas(kind, num_train_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)

    def alpha_bar(self, t):
        """alpha_bar at timesteps t (any shape; fractional t interpolates linearly between the integers)."""
        t = torch.as_tensor(t).detach().to("cpu", torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - low
        return (1 - w) * self.alphas_cumprod[low] + w * self.alphas_cumprod[high]

    def timestep(self, alpha_bar):
        """The (fractional) timestep at which alpha_bar takes the given values: the inverse of `alpha_bar`."""
        ascending = self.alphas_cumprod.flip(0).numpy()
        t = np.interp(np.asarray(alpha_bar, dtype=np.float64), ascending, np.arange(self.num_train_timesteps)[::-1])
        return torch.from_numpy(t)

    def training_timesteps(self, n, sampling="uniform", loc=None, scale=None, device="cpu"):
        """n training timesteps: t ~ U{0..T-1} (uniform: integers, exactly as training_loss draws them), or
        fractional timesteps at log-SNRs from sample_log_snr (loc, scale default: TIMESTEP_SAMPLINGS) mapped
        through this schedule's inverse, t = timestep(sigmoid(lambda)). A log-SNR beyond the schedule's range
        lands on its end (t = 0 or T - 1)."""
        if sampling == "uniform":
            return torch.randint(0, self.num_train_timesteps, (n,), device=device)
        default_loc, default_scale = TIMESTEP_SAMPLINGS.get(sampling, (None, None))  # unknown: sample_log_snr says
        log_snr = sample_log_snr(sampling, n, default_loc if loc is None else loc,
                                 default_scale if scale is None else scale)
        return self.timestep(torch.sigmoid(log_snr)).to(device, torch.float32)

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x0) for timesteps t (B)."""
        return q_sample(x0, noise, self.alpha_bar(t))

    def training_loss(self, model_fn, x0, prediction_type="epsilon", min_snr_gamma=None, t=None, noise=None):
        """The simplified DDPM loss E ||target - model_fn(x_t, t)||^2 with t ~ U{0..T-1} and eps ~ N(0, I)
        (unless given), target = eps or v, each sample weighted by loss_weight (min-SNR)."""
        check_prediction_type(prediction_type)
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        alpha_bar = self.alpha_bar(t)  # B
        x_t = q_sample(x0, noise, alpha_bar)
        target = prediction_target(x0, noise, alpha_bar, prediction_type)
        loss = (model_fn(x_t, t).float() - target.float()).pow(2).flatten(1).mean(1)  # B
        if min_snr_gamma:
            loss = loss * loss_weight(alpha_bar, prediction_type, min_snr_gamma).to(loss)
        return loss.mean()


def check_prediction_type(prediction_type):
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"unknown prediction type {prediction_type!r} (choose {' or '.join(PREDICTION_TYPES)})")


# ----------------------------------------------------------------------------------------------
# The maths between x0, eps, v and x_t: every formula once. alpha_bar is B (per sample) or a scalar.


def _coef(values, x):
    """float64 coefficients (scalar or B) -> broadcastable over x, in x's dtype and on its device."""
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1))
    return values.to(x.dtype).to(x.device)


def q_sample(x0, noise, alpha_bar):
    """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return _coef(alpha_bar.sqrt(), x0) * x0 + _coef((1 - alpha_bar).sqrt(), x0) * noise


def prediction_target(x0, noise, alpha_bar, prediction_type):
    """What the model should output: eps itself, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0."""
    if prediction_type == "epsilon":
        return noise
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return _coef(alpha_bar.sqrt(), x0) * noise - _coef((1 - alpha_bar).sqrt(), x0) * x0


def predicted_x0(x_t, model_output, alpha_bar, prediction_type):
    """x0 from a model output: (x_t - sqrt(1 - a) eps) / sqrt(a) for eps; sqrt(a) x_t - sqrt(1 - a) v for v
    (which stays finite at alpha_bar = 0, the last step of a zero-terminal-SNR schedule)."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if prediction_type == "epsilon":
        return (x_t - _coef((1 - alpha_bar).sqrt(), x_t) * model_output) / _coef(alpha_bar.sqrt(), x_t)
    return _coef(alpha_bar.sqrt(), x_t) * x_t - _coef((1 - alpha_bar).sqrt(), x_t) * model_output


def predicted_eps(x_t, x0, alpha_bar):
    """eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return (x_t - _coef(alpha_bar.sqrt(), x_t) * x0) / _coef((1 - alpha_bar).sqrt(), x_t)


def loss_weight(alpha_bar, prediction_type, min_snr_gamma=None):
    """Per-sample weights w that make w ||target - output||^2 = lambda ||x0 - x0_hat||^2, SNR = alpha_bar / (1 -
    alpha_bar). Unweighted, lambda = SNR for eps targets and SNR + 1 for v. Min-SNR-gamma (Hang et al. 2023) caps it:
    lambda = min(SNR, gamma)."""
    snr = alpha_bar / (1 - alpha_bar)
    unweighted = snr if prediction_type == "epsilon" else snr + 1
    if not min_snr_gamma:
        weight = torch.ones_like(snr)
    elif prediction_type == "epsilon":
        weight = (min_snr_gamma / snr).clamp(max=1.0)  # min(SNR, gamma) / SNR, and 1 at SNR 0
    else:
        weight = snr.clamp(max=min_snr_gamma) / unweighted
    return weight


# ----------------------------------------------------------------------------------------------
# Samplers: sample_xxx(denoiser, latents, schedule, timesteps, generator=None, progress=False, ...) -> x0.
# `timesteps` descend (fractional values allowed); `generator` is a torch.Generator or a list with one per row.


def sampling_timesteps(schedule, steps, karras=False, start=None):
    """`steps` descending timesteps from `start` (default T-1, pure noise) to 0, evenly spaced integers (the
    trained chain's own timesteps), or (karras) spaced evenly in sigma^(1/7) between sigma(start) and the
    schedule's smallest sigma, sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022)."""
    T = schedule.num_train_timesteps
    start = T - 1 if start is None else start
    if not 1 <= steps <= T:
        raise UserError(f"steps must be between 1 and {T}, got {steps}")
    if not karras:
        return torch.linspace(start, 0, steps, dtype=torch.float64).round()
    if schedule.alphas_cumprod[-1] == 0:
        raise UserError("Karras spacing needs a finite largest sigma; a zero-terminal-SNR schedule has none")
    sigmas = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()
    rho, ramp = 7.0, torch.linspace(0, 1, steps, dtype=torch.float64)
    high, low = sigmas[start] ** (1 / rho), sigmas[0] ** (1 / rho)
    karras_sigmas = (high + ramp * (low - high)) ** rho
    return schedule.timestep(1 / (1 + karras_sigmas**2))


def img2img_timesteps(schedule, steps, karras, strength):
    """SDEdit's timesteps: strength in (0, 1] names a noise level, that of timestep round(strength * (T - 1)), so
    it means the same under every sampler and spacing; the image is denoised from there in max(1, round(strength *
    steps)) steps of the spacing asked for."""
    if strength is None or not 0 < strength <= 1:
        raise UserError(f"strength must be in (0, 1], got {strength}")
    start = round(strength * (schedule.num_train_timesteps - 1))
    return sampling_timesteps(schedule, max(1, round(strength * steps)), karras, start=start)


def randn(shape, generator=None, device="cpu"):
    """N(0, I) noise drawn on the CPU (the same numbers on every device). With a list of generators, row i
    comes from generator i alone, so each image of a batch can be reproduced on its own."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator]).to(device)
    return torch.randn(shape, generator=generator).to(device)


def _alpha_bars(schedule, timesteps):
    """alpha_bar at each step and at the step after it (1 = clean data after the last step), as float lists."""
    alpha_bar = schedule.alpha_bar(timesteps)
    return alpha_bar.tolist(), torch.cat([alpha_bar[1:], torch.ones(1, dtype=torch.float64)]).tolist()


def _step_range(timesteps, progress, name):
    return trange(len(timesteps), disable=not progress, desc=name, leave=False)


def _timestep_batch(t, x):
    return torch.full((x.shape[0],), float(t), device=x.device)


@torch.no_grad()
def sample_ddpm(denoiser, latents, schedule, timesteps, generator=None, progress=False):
    """Ancestral sampling from the posterior q(x_prev | x_t, x0) (Ho et al. 2020, eq. 6-7):
    mean = sqrt(a_prev) beta / (1 - a) x0 + sqrt(1 - beta) (1 - a_prev) / (1 - a) x_t,
    variance = beta (1 - a_prev) / (1 - a), with the respaced beta = 1 - a / a_prev between consecutive
    timesteps (Nichol & Dhariwal 2021), so it runs the original 1000 steps or fewer."""
    x = latents
    alpha_bars, alpha_bars_prev = _alpha_bars(schedule, timesteps)
    for i in _step_range(timesteps, progress, "ddpm"):
        a, a_prev = alpha_bars[i], alpha_bars_prev[i]
        beta = 1 - a / a_prev
        x0 = denoiser(x, _timestep_batch(timesteps[i], x))
        x = (a_prev**0.5 * beta / (1 - a)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)) * x
        variance = beta * (1 - a_prev) / (1 - a)
        if variance > 0:
            x = x + variance**0.5 * randn(x.shape, generator, x.device).to(x.dtype)
    return x


@torch.no_grad()
def sample_ddim(denoiser, latents, schedule, timesteps, generator=None, progress=False, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev). eta = 0 is deterministic; eta = 1 is DDPM."""
    x = latents
    alpha_bars, alpha_bars_prev = _alpha_bars(schedule, timesteps)
    for i in _step_range(timesteps, progress, "ddim"):
        a, a_prev = alpha_bars[i], alpha_bars_prev[i]
        x0 = denoiser(x, _timestep_batch(timesteps[i], x))
        eps = predicted_eps(x, x0, a)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device).to(x.dtype)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, latents, schedule, timesteps, generator=None, progress=False, lower_order_final=False):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), in half-log-SNR lambda = log(alpha / sigma) with
    alpha = sqrt(a), sigma = sqrt(1 - a), h = lambda_next - lambda:
    x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) D, D = (1 + 1/2r) x0 - (1/2r) x0_prev, r = h_prev / h;
    D = x0 (first order, = DDIM) on the first step and on the last one (to clean data).
    lower_order_final: first order on the step into the last timestep too. With evenly spaced timesteps that
    step is several times longer in lambda than the one before (r ~ 0.2 at 20 steps), and the second-order
    extrapolation over it overshoots (diffusers' `lower_order_final`)."""
    x = latents
    alpha_bars, alpha_bars_next = _alpha_bars(schedule, timesteps)
    x0_prev = h_prev = None
    first_order_from = len(timesteps) - (2 if lower_order_final else 1)  # the last step (to clean data) always
    for i in _step_range(timesteps, progress, "dpmpp-2m"):
        a, a_next = alpha_bars[i], alpha_bars_next[i]
        x0 = denoiser(x, _timestep_batch(timesteps[i], x))
        h = _half_log_snr(a_next) - _half_log_snr(a)
        if x0_prev is None or i >= first_order_from:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = ((1 - a_next) / (1 - a)) ** 0.5 * x - a_next**0.5 * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def _half_log_snr(alpha_bar):
    """lambda = log(sqrt(a) / sqrt(1 - a)): -inf at a = 0 (pure noise), +inf at a = 1 (clean data)."""
    if alpha_bar in (0, 1):
        return math.inf if alpha_bar == 1 else -math.inf
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar))


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp-2m": sample_dpmpp_2m}
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpmpp-2m": 20}
# Each sampler's own spacing, the one its accuracy test checks: ddpm is the ancestral chain on the integer timesteps
# it was trained on, and ddim was derived and is run on evenly respaced ones (Song et al. 2021); the ODE solver
# dpmpp-2m takes Karras steps, which measured better than even ones on the bundled model (docs/sampler-steps.md).
DEFAULT_KARRAS = {"ddpm": False, "ddim": False, "dpmpp-2m": True}
# diffusion.py without --prompt: 10 Karras-spaced dpmpp-2m steps score within the FD noise of 20 on 1,000 samples of
# the bundled unconditional model in half the time; guided sampling loses at 10 (docs/sampler-steps.md), and
# evaluate.py and caption_use.py measure at DEFAULT_STEPS.
UNPROMPTED_STEPS = {**DEFAULT_STEPS, "dpmpp-2m": 10}


def make_denoiser(model_fn, schedule, prediction_type):
    """model_fn(x_t, t) -> eps or v  ==>  denoiser(x_t, t) -> x0, what every sampler consumes."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon" and schedule.alphas_cumprod[-1] == 0:
        raise UserError("an epsilon-prediction model cannot sample a zero-terminal-SNR schedule "
                        "(x0 is undefined at the last step); train with v prediction")

    def denoiser(x_t, t):
        return predicted_x0(x_t, model_fn(x_t, t).float(), schedule.alpha_bar(t), prediction_type)

    return denoiser


def guided_model_fn(unet, context=None, context_mask=None, uncond_context=None, uncond_mask=None, guidance_scale=1.0,
                    image_embed=None, uncond_image_embed=None):
    """Classifier-free guidance (Ho & Salimans 2022): out = uncond + scale (cond - uncond), both branches in one
    batched forward pass. The conditional branch sees `context` and `image_embed` (B x E), the unconditional one
    `uncond_context` and `uncond_image_embed` (None where the model takes none). guidance_scale: a number, or t ->
    the scale at timestep t (guidance_scales). Where the scale is 1 (or there is no unconditional branch) the
    output is the conditional prediction alone: one forward pass."""
    scale_at = guidance_scale if callable(guidance_scale) else lambda t: guidance_scale
    guided = uncond_context is not None or uncond_image_embed is not None

    def model_fn(x, t):
        scale = scale_at(t)
        if not guided or scale == 1:
            return unet(x, t, context, context_mask, **_embed(image_embed))
        out = unet(torch.cat([x, x]), torch.cat([t, t]), _both(context, uncond_context),
                   _both(context_mask, uncond_mask), **_embed(_both(image_embed, uncond_image_embed)))
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return model_fn


def _embed(image_embed):
    """The image_embed keyword for models that take one; a text-only model (or any callable) is called as before."""
    return {} if image_embed is None else {"image_embed": image_embed}


def _both(cond, uncond):
    """The two branches' inputs stacked along the batch (None where the model takes none)."""
    return None if cond is None else torch.cat([cond, uncond])


# Classifier-free guidance at scale 3 wherever sigma > 0.28 (the low end of Kynkäänniemi et al. 2024's interval):
# on the bundled style model it scores per style as well as scale 5 inside their (0.28, 5.42], and, guiding the
# high noise levels where the layout is set, it lets a caption change a seed's composition more (README,
# "Guidance"). 16 of 20 Karras steps are guided (6 in (0.28, 5.42]), so a prompted image costs 1.8 model
# evaluations a step instead of 1.3.
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_GUIDANCE_INTERVAL = (0.28, float("inf"))


def guidance_scales(schedule, scale, interval=None, high=None):
    """t -> the guidance scale at the noise level sigma(t) = sqrt((1 - a) / a) (EDM's unit, the one Kynkäänniemi
    et al. 2024 give their interval in): `scale` where sigma lies in the (low, high] of `interval` (None:
    everywhere; pure noise, a = 0, counts as inside) and 1, the conditional prediction alone, outside it.
    high = (high_scale, sigma_split): high_scale instead of `scale` where sigma > sigma_split, strong guidance where
    the layout is set and milder where colour and detail are."""

    def scale_at(t):
        a = schedule.alpha_bar(t[:1]).item()  # every row of a batch is at the same timestep
        sigma = float("inf") if a == 0 else ((1 - a) / a) ** 0.5
        if interval is not None and a > 0 and not interval[0] < sigma <= interval[1]:
            return 1.0
        return high[0] if high is not None and sigma > high[1] else scale

    return scale_at


def slerp(a, b, fraction):
    """Spherical interpolation from a to b: keeps the norm that Gaussian noise has, where a straight line
    through the middle would shrink it (White 2016)."""
    cos_omega = (a.flatten() @ b.flatten()) / (a.norm() * b.norm())
    omega = torch.arccos(cos_omega.clamp(-1, 1)).item()
    if omega < 1e-4:
        return (1 - fraction) * a + fraction * b
    return (math.sin((1 - fraction) * omega) * a + math.sin(fraction * omega) * b) / math.sin(omega)


# ----------------------------------------------------------------------------------------------
# A trained model: UNet + schedule + VQGAN (+ text encoder)


class Pipeline:
    """Sampling from a UNet (in eval mode), its noise schedule and VQGAN, on the UNet's device. `config` is the
    checkpoint JSON; only "prediction_type" is required ("latent_shape", "latent_scale", "text_encoder" and
    "max_text_length" default to the UNet's, the VQGAN's and the default encoder)."""

    def __init__(self, unet, schedule, vqgan, config, text_encoder=None, bf16=False, channels_last=True,
                 compile=False, image_embedder=None, prior=None):
        check_prediction_type(config["prediction_type"])
        self.unet, self.schedule, self.vqgan, self.config = unet, schedule, vqgan, config
        self.prediction_type = config["prediction_type"]
        unet_config = unet.config
        self.latent_shape = tuple(config.get("latent_shape") or
                                  (unet_config["in_channels"], unet_config["sample_size"], unet_config["sample_size"]))
        self.latent_scale = float(config.get("latent_scale") or vqgan.latent_scale)
        self.conditional = unet.context_dim is not None
        self.device = next(unet.parameters()).device
        self.bf16 = bf16
        self.channels_last = channels_last
        # channels-last: faster convolutions (CPU: UNet ~10%, decoder ~25%), the same outputs to about 1e-5
        layout = torch.channels_last if channels_last else torch.contiguous_format
        unet.to(memory_format=layout)
        vqgan.to(memory_format=layout)
        self.unet_forward = torch.compile(unet) if compile else unet
        self._text_encoder = text_encoder
        self._image_embedder = image_embedder  # an ImageEmbedder, or its path (loaded on first use)
        self._prior = prior  # a prior.py EmbeddingPrior, or its path (loaded on first use), or None

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from text_encoder import DEFAULT_TEXT_ENCODER, TextEncoder

            self._text_encoder = TextEncoder(self.config.get("text_encoder") or DEFAULT_TEXT_ENCODER, self.device,
                                             max_length=self.config.get("max_text_length", 32))
        return self._text_encoder

    @property
    def image_embedder(self):
        if self.unet.image_embed_dim is None:
            raise UserError("this model takes no image embedding (--like): train one with trainer.py "
                            "--image_embeddings")
        if self._image_embedder is None:
            raise UserError("this model names no image embedder (image_embedding.py) in its config")
        if not isinstance(self._image_embedder, torch.nn.Module):
            from image_embedding import load_embedder

            self._image_embedder = load_embedder(self._image_embedder, self.device)
        return self._image_embedder

    @torch.no_grad()
    def prior_embeddings(self, num_images, seed, prompt=None):
        """num_images x E embeddings from the model's prior, row i from seed + i (so an image is redone alone), or
        None where the model takes no embedding or has no prior (its unconditional mode, the null embedding).
        prompt: a caption for a caption-conditioned prior (unCLIP's path: caption -> prior -> embedding -> image)."""
        if self.unet.image_embed_dim is None or self._prior is None:
            return None
        from prior import load_prior, sample_embeddings

        if not isinstance(self._prior, torch.nn.Module):
            self._prior = load_prior(self._prior, self.device)
        return sample_embeddings(self._prior, num_images, seed, captions=prompt,
                                 text_encoder=None if prompt is None else self.text_encoder)

    def image_embed_branches(self, image_embeds, num_images):
        """guided_model_fn's image_embed and uncond_image_embed: the given embeddings against the null one."""
        if image_embeds is None:
            return {}
        if self.unet.image_embed_dim is None:
            raise UserError("this model takes no image embedding (--like): train one with trainer.py "
                            "--image_embeddings")
        if tuple(image_embeds.shape) != (num_images, self.unet.image_embed_dim):
            raise UserError(f"image embeddings must be {num_images} x {self.unet.image_embed_dim}, got "
                            f"{tuple(image_embeds.shape)}")
        embeds = image_embeds.to(self.device).float()
        return {"image_embed": embeds, "uncond_image_embed": self.unet.null_image_embed.detach().expand_as(embeds)}

    @torch.no_grad()
    def embed_images(self, images):
        """Images B x 3 x H x W in [-1, 1] -> the image embeddings B x E this model is conditioned on."""
        return self.image_embedder(images.to(self.device)).float()

    def contexts(self, num_images, prompt=None, negative_prompt=None):
        """(context, mask, uncond_context, uncond_mask) for guided_model_fn. No prompt: the null embedding alone;
        the uncond branch gets the null embedding, or the negative prompt where one is given."""
        if not self.conditional:
            if prompt is not None or negative_prompt is not None:
                raise UserError("this model is unconditional: it takes no --prompt or --negative_prompt")
            return None, None, None, None
        if prompt is None:
            if negative_prompt is not None:
                raise UserError("--negative_prompt needs a --prompt")
            return None, None, None, None
        prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
        context, mask = self.text_encoder.encode(prompts)
        if negative_prompt is not None:
            uncond, uncond_mask = self.text_encoder.encode([negative_prompt] * num_images)
        else:
            uncond, uncond_mask = self.unet.drop_context(context, mask, torch.ones(num_images, dtype=torch.bool,
                                                                                    device=self.device))
        return context, mask, uncond, uncond_mask

    @torch.no_grad()
    def encode(self, images):
        """Images B x 3 x H x W in [-1, 1] -> scaled latents, the space diffusion runs in."""
        with autocast(self.device, self.bf16):
            return self.vqgan.encode(images.to(self.device)).float() * self.latent_scale

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents -> images B x 3 x H x W in [-1, 1]."""
        with autocast(self.device, self.bf16):
            return self.vqgan.decode(latents / self.latent_scale).float().clamp(-1, 1)

    @torch.no_grad()
    def sample_latents(self, num_images=1, seed=0, sampler="dpmpp-2m", steps=20, prompt=None, negative_prompt=None,
                       guidance_scale=DEFAULT_GUIDANCE_SCALE, guidance_interval=DEFAULT_GUIDANCE_INTERVAL,
                       guidance_high=None, eta=0.0, karras=None, lower_order_final=False, init_images=None,
                       strength=None, noise=None, image_embeds=None, progress=True):
        """Scaled latents of `num_images` samples; image i draws all its noise from torch.Generator(seed + i).
        karras: Karras et al. spacing of the steps (else even in t; None: the sampler's own, DEFAULT_KARRAS, and
        even for a schedule with zero terminal SNR); lower_order_final: dpmpp-2m's first-order step
        into the last timestep; guidance_interval (low, high): guide only where low < sigma <= high (None: everywhere);
        guidance_high (scale, sigma): that scale instead where the noise level is above sigma (None: one scale).
        init_images (B x 3 x H x W) + strength in (0, 1]: SDEdit img2img (Meng et al. 2022), noised to the noise
        level of timestep round(strength * (T - 1)), the same for every sampler and spacing, and denoised from there
        in max(1, round(strength * steps)) steps of the sampler's spacing. `noise` replaces the start noise.
        image_embeds (num_images x E): what an embedding-conditioned model draws (embed_images), guided against its
        null embedding; None: its prior's samples (prior_embeddings; for a model without text, under `prompt` when
        its prior is caption-conditioned), or without a prior its unconditional mode."""
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r} (choose {', '.join(SAMPLERS)})")
        if eta and sampler != "ddim":
            raise UserError("--eta applies to the ddim sampler only")
        if lower_order_final and sampler != "dpmpp-2m":
            raise UserError("--lower_order_final applies to the dpmpp-2m sampler only")
        if guidance_scale < 0 or (guidance_high is not None and min(guidance_high) < 0):
            raise UserError(f"guidance scales and noise levels must be at least 0, got {guidance_scale} and "
                            f"{guidance_high}")
        generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
        if noise is None:
            noise = randn((num_images, *self.latent_shape), generators)
        noise = noise.to(self.device)
        if karras is None:
            karras = DEFAULT_KARRAS[sampler] and self.schedule.alphas_cumprod[-1] > 0
        if init_images is None:
            timesteps = sampling_timesteps(self.schedule, steps, karras)
            latents = noise
        else:
            timesteps = img2img_timesteps(self.schedule, steps, karras, strength)
            latents = self.schedule.q_sample(self.encode(init_images), timesteps[:1].expand(num_images), noise)
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        if self.conditional or self.unet.image_embed_dim is None or image_embeds is not None:
            prompt_to_unet = prompt
        else:  # an embedding model without text: a prompt goes through its prior
            image_embeds, prompt_to_unet = self.prior_embeddings(num_images, seed, prompt), None
            if prompt is not None and image_embeds is None:
                raise UserError("this model takes no --prompt: it has no caption-conditioned prior (prior.py "
                                "--conditional) to turn one into an image embedding")
        model_fn = guided_model_fn(self.unet_forward, *self.contexts(num_images, prompt_to_unet, negative_prompt),
                                   guidance_scale=guidance_scales(self.schedule, guidance_scale, guidance_interval,
                                                                  guidance_high),
                                   **self.image_embed_branches(image_embeds, num_images))

        def model_fn_autocast(x, t):
            with autocast(self.device, self.bf16):
                return model_fn(x, t).float()

        denoiser = make_denoiser(model_fn_autocast, self.schedule, self.prediction_type)
        options = {"ddim": {"eta": eta}, "dpmpp-2m": {"lower_order_final": lower_order_final}}.get(sampler, {})
        return SAMPLERS[sampler](denoiser, latents, self.schedule, timesteps, generators, progress, **options)

    def generate(self, num_images=1, seed=0, **options):
        """Images B x 3 x H x W in [-1, 1]; options as for sample_latents."""
        return self.decode(self.sample_latents(num_images, seed, **options))


# ----------------------------------------------------------------------------------------------
# Checkpoints: NAME.safetensors ("model.*", "ema.*", optionally "vqgan.*") + NAME.json (see DEVELOPERS.md)


def save_diffusion_model(path, model_state, ema_state, config, vqgan=None, dtype=None, image_embedder=None,
                         prior=None):
    """Write a self-describing diffusion checkpoint. `config` is the JSON of DEVELOPERS.md ("unet", "schedule",
    "prediction_type", "latent_shape", "latent_scale", "text_encoder", "max_text_length", "training").
    `vqgan`: a path to a VQGAN checkpoint (stored relative to the checkpoint's folder), or a VQModel whose
    weights are embedded under "vqgan.*"; None keeps config["vqgan"] as it is. `image_embedder`: the path of the
    image_embedding.py embedder an embedding-conditioned UNet reads, `prior` that of the prior.py model its
    samples draw their embeddings from (both stored relative like the VQGAN's). `dtype` (e.g. torch.float16) is
    for storage only: loading gives fp32."""
    config = {**config, "model": "noise2art-unet"}
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"ema.{k}": v for k, v in (ema_state or {}).items()})
    if isinstance(vqgan, VQModel):
        tensors.update({f"vqgan.{k}": v for k, v in vqgan.state_dict().items()})
        config.update(vqgan=None, vqgan_config=vqgan.config)
    elif vqgan is not None:
        config["vqgan"] = relative_reference(vqgan, path)
    for key, target in (("image_embedder", image_embedder), ("prior", prior)):
        if target is not None:
            config[key] = relative_reference(target, path)
    return save_model(path, tensors, config, dtype=dtype)


def relative_reference(target, checkpoint):
    """Model file `target` as a path relative to the folder of `checkpoint` (what a checkpoint stores)."""
    return os.path.relpath(model_paths(target)[0].resolve().with_suffix(""), Path(checkpoint).resolve().parent)


def _weights(tensors, prefix):
    return {k[len(prefix):]: v.float() if v.is_floating_point() else v
            for k, v in tensors.items() if k.startswith(prefix)}


def unet_weights(tensors, path, use_ema=True):
    """(UNet weights in fp32, "ema" or "model"): a checkpoint's EMA weights where it has them and `use_ema`, else
    its raw ones."""
    has_raw, has_ema = (any(k.startswith(p) for k in tensors) for p in ("model.", "ema."))
    if not use_ema and not has_raw:
        raise UserError(f"{path} holds only EMA weights (a sampling export): drop --no_ema")
    prefix = "ema." if has_ema and (use_ema or not has_raw) else "model."
    return _weights(tensors, prefix), prefix[:-1]


def read_diffusion_model(path):
    """(tensors, config) of a checkpoint written by save_diffusion_model; anything else is a UserError."""
    tensors, config = load_model(path, "diffusion checkpoint")
    if config.get("model") != "noise2art-unet":
        raise UserError(f"{path} is not a Noise2Art diffusion checkpoint (model: {config.get('model')!r})")
    return tensors, config


def referenced_vqgan(path, config):
    """The VQGAN a diffusion checkpoint at `path` names (config["vqgan"], relative to its config file), or None
    where it embeds one."""
    return referenced_file(path, config, "vqgan")


def referenced_file(path, config, key):
    """The model file that config[key] of the checkpoint at `path` names, relative to it; None where it names none."""
    if config.get(key) is None:
        return None
    return Path(model_paths(path)[1]).resolve().parent / config[key]


def load_diffusion_model(path, device="cpu", use_ema=True, vqgan_path=None, **pipeline_options):
    """A Pipeline from a checkpoint written by save_diffusion_model, in eval mode, fp32. use_ema picks the EMA
    weights where the checkpoint has them; vqgan_path replaces the VQGAN the checkpoint names or embeds."""
    tensors, config = read_diffusion_model(path)
    try:
        unet = UNet(**config["unet"])
        schedule = NoiseSchedule(**config["schedule"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"diffusion checkpoint {path} has a malformed config: {err}") from None
    weights, config["weights"] = unet_weights(tensors, path, use_ema)
    load_weights(unet, weights, f"UNet weights '{config['weights']}.*' of {path}")
    vqgan_path = vqgan_path or referenced_vqgan(path, config)
    if vqgan_path is None:
        if "vqgan_config" not in config:
            raise UserError(f"diffusion checkpoint {path} names no VQGAN and embeds none")
        vqgan = VQModel(config["vqgan_config"])
        load_weights(vqgan, _weights(tensors, "vqgan."), f"VQGAN weights embedded in {path}")
    else:
        vqgan = load_vqgan(vqgan_path)
    unet = unet.to(device).eval().requires_grad_(False)
    vqgan = vqgan.to(device).eval().requires_grad_(False)
    pipeline_options.setdefault("prior", referenced_file(path, config, "prior"))
    return Pipeline(unet, schedule, vqgan, config, image_embedder=referenced_file(path, config, "image_embedder"),
                    **pipeline_options)


def export_diffusion_model(src, dst, dtype=torch.float16, prior=None, image_embedder=None):
    """A sampling-only copy of checkpoint `src` at `dst`: the EMA weights (the raw ones where there is no EMA)
    stored in `dtype`, the VQGAN embedded as before or referenced relative to `dst`, like the image embedder and
    the prior (`prior`, `image_embedder`: other files' paths instead of src's, e.g. copies shipped beside dst)."""
    pipeline = load_diffusion_model(src)
    config = {k: v for k, v in pipeline.config.items()
              if k not in ("weights", "vqgan", "vqgan_config", "image_embedder", "prior")}
    vqgan = referenced_vqgan(src, pipeline.config) or pipeline.vqgan
    image_embedder = image_embedder or referenced_file(src, pipeline.config, "image_embedder")
    prior = prior or referenced_file(src, pipeline.config, "prior")
    return save_diffusion_model(dst, {}, pipeline.unet.state_dict(), config, vqgan=vqgan, dtype=dtype,
                                image_embedder=image_embedder, prior=prior)


# ----------------------------------------------------------------------------------------------
# Command line


def default_checkpoint(conditional, like=False):
    """The bundled model a command without --unet_ckpt_path samples: unet-cond with --prompt, unet-like (the
    embedding-conditioned UNet) with --like, unet-uncond otherwise."""
    path = BUNDLED_MODELS / ("unet-cond.json" if conditional else "unet-like.json" if like else "unet-uncond.json")
    if not path.is_file():
        raise UserError(f"no bundled model at {path} yet: train one with trainer.py and pass it with --unet_ckpt_path")
    return path


def load_image(path, resolution, what="init image"):
    """An image file (any size PIL reads) as 1 x 3 x R x R in [-1, 1], centre-cropped; unreadable: UserError."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read {what} {path}: {err}") from None
    return image_to_tensor(img, resolution)[None]  # 1 x 3 x R x R



def next_image_index(outdir):
    """Files are numbered 00000.png, 00001.png, ... continuing after what is already in outdir."""
    numbers = [int(p.stem) for p in Path(outdir).glob("*.png") if re.fullmatch(r"\d{5}", p.stem)]
    return max(numbers, default=-1) + 1


def add_sampling_arguments(parser, unprompted_steps=None):
    """The sampling flags diffusion.py and evaluate.py --samples_from share; sampling_options(args) reads them.
    unprompted_steps: the default steps per sampler without --prompt, where they differ from DEFAULT_STEPS."""
    parser.add_argument("--sampler", default="dpmpp-2m", choices=list(SAMPLERS), help="sampling algorithm")
    unprompted_help = f"; without --prompt: {unprompted_steps}" if unprompted_steps else ""
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"denoising steps (default per sampler: {DEFAULT_STEPS}{unprompted_help})")
    parser.add_argument("--spacing", default="auto", choices=["auto", "karras", "even"],
                        help="timesteps spaced as Karras et al. 2022 (rho = 7) or evenly in t; auto = the sampler's "
                             "own: even for ddpm and ddim, karras for dpmpp-2m (even for a zero-terminal-SNR "
                             "schedule, whose largest sigma is infinite)")
    parser.add_argument("--lower_order_final", action="store_true",
                        help="dpmpp-2m: first-order step into the last timestep (as diffusers' lower_order_final)")
    parser.add_argument("--guidance_scale", type=non_negative_float, default=DEFAULT_GUIDANCE_SCALE,
                        help="classifier-free guidance scale with --prompt, at least 0 (1 = the conditional "
                             "prediction alone, 0 = the unconditional one; default: %(default)s)")
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=list(DEFAULT_GUIDANCE_INTERVAL),
                        metavar=("SIGMA_LOW", "SIGMA_HIGH"),
                        help="guide only where the noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) is in "
                             "(LOW, HIGH] (Kynkäänniemi et al. 2024); elsewhere the conditional prediction alone "
                             "(default: %(default)s; 0 inf guides every step)")
    parser.add_argument("--guidance_high", type=non_negative_float, nargs=2, default=None,
                        metavar=("SCALE", "SIGMA"),
                        help="guide at SCALE instead of --guidance_scale where sigma > SIGMA (inside the interval): "
                             "strong guidance at the high noise levels where the layout is set (default: one scale)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="bf16 autocast or fp32; auto = bf16 where it pays (CUDA; CPUs with AVX512-BF16 / "
                             "AMX whose bf16 matmul measures >= 1.3x faster), fp32 elsewhere")


def sampling_options(args, default_steps=DEFAULT_STEPS):
    """Pipeline.sample_latents keyword arguments from add_sampling_arguments' flags; steps from default_steps per
    sampler where --steps is not given."""
    if args.guidance_interval is not None and not 0 <= args.guidance_interval[0] < args.guidance_interval[1]:
        raise UserError(f"--guidance_interval needs 0 <= SIGMA_LOW < SIGMA_HIGH, got {args.guidance_interval}")
    return dict(sampler=args.sampler, steps=args.steps or default_steps[args.sampler],
                karras={"auto": None, "karras": True, "even": False}[args.spacing],
                lower_order_final=args.lower_order_final, guidance_scale=args.guidance_scale,
                guidance_interval=args.guidance_interval, guidance_high=args.guidance_high)


def use_bf16(precision, device):
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def parse_args(argv):
    parser = ArgumentParser(__file__, description="Generate paintings with a trained latent diffusion model.")
    parser.add_argument("--unet_ckpt_path", default=None,
                        help="diffusion checkpoint (NAME, NAME.json or NAME.safetensors); default: the bundled "
                             "models/unet-uncond.json, or models/unet-cond.json with --prompt")
    parser.add_argument("--vqgan", default=None,
                        help="decode with this VQGAN (NAME, NAME.json or NAME.safetensors) instead of the "
                             "checkpoint's: one of the same latent space, such as a decoder fine-tune")
    parser.add_argument("--num_images", type=positive_int, default=16, help="how many images to generate")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images denoised together")
    add_sampling_arguments(parser, UNPROMPTED_STEPS)
    parser.add_argument("--eta", type=non_negative_float, default=0.0,
                        help="DDIM noise: 0 deterministic, 1 = DDPM (ddim only)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i, so any image can be redone alone")
    parser.add_argument("--prompt", nargs="+", default=None,
                        help="caption to steer a text-conditioned model; several captions give one grid row each "
                             "(--num_images per caption, the same seeds)")
    parser.add_argument("--negative_prompt", default=None, help="caption to steer away from (replaces the null "
                                                                "embedding in classifier-free guidance)")
    parser.add_argument("--init_image", default=None, help="img2img: start from this image (SDEdit)")
    parser.add_argument("--strength", type=float, default=None,
                        help="img2img: how far to noise the init image, in (0, 1]: to the noise level of timestep "
                             "strength x (T - 1), whatever the sampler and spacing; 1 = pure noise (default 0.75)")
    parser.add_argument("--like", action="append", default=None, metavar="IMAGE",
                        help="variations of a painting (any size; JPEG, PNG, WebP): a model trained with "
                             "--image_embeddings draws fresh paintings of its image embedding; give it twice to "
                             "blend two paintings (--mix)")
    parser.add_argument("--mix", type=float, default=None,
                        help="with two --like: how far from the first painting's embedding to the second's, in "
                             "[0, 1] (spherical interpolation; default 0.5)")
    parser.add_argument("--prior", default=None,
                        help="for a model trained with --image_embeddings: the prior.py model its samples draw their "
                             "embeddings from (default: the one its config names), or 'none' for its unconditional "
                             "mode; with --export, the prior the copy names")
    parser.add_argument("--interpolate", action="store_true",
                        help="slerp the start noise from --seed to --seed + 1 over --num_images frames")
    parser.add_argument("--interpolate_to", type=int, default=None, metavar="SEED",
                        help="with --interpolate: the seed of the last frame's noise (default: --seed + 1)")
    parser.add_argument("--outdir", default="samples", help="folder for the PNGs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA ones")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels-last memory format for the UNet and the VQGAN decoder (faster convolutions; "
                             "--no-channels_last: plain NCHW)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off for many images)")
    parser.add_argument("--export", metavar="DST", default=None,
                        help="instead of sampling, write a sampling-only copy of the checkpoint to DST: EMA weights "
                             "in --export_dtype, the VQGAN reference kept (how the bundled models were made)")
    parser.add_argument("--export_dtype", default="fp16", choices=list(EXPORT_DTYPES), help="storage type for --export")
    return parser.parse_args(argv)


def check_args(args):
    if args.strength is not None and args.init_image is None:
        raise UserError("--strength needs an --init_image")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UserError(f"--strength must be in (0, 1], got {args.strength}")
    if args.interpolate and args.num_images < 2:
        raise UserError("--interpolate needs --num_images of at least 2")
    if args.interpolate_to is not None and not args.interpolate:
        raise UserError("--interpolate_to needs --interpolate")
    if args.like is not None and len(args.like) > 2:
        raise UserError(f"--like takes one painting (variations) or two (a blend), got {len(args.like)}")
    if args.mix is not None and (args.like is None or len(args.like) != 2):
        raise UserError("--mix needs two --like paintings")
    if args.like is not None and args.prompt is not None:
        raise UserError("--like draws variations of a painting and takes no --prompt")
    if args.mix is not None and not 0 <= args.mix <= 1:
        raise UserError(f"--mix must be in [0, 1], got {args.mix}")


def run_parameters(args, checkpoint, pipeline, options, seed, num_images, prompts):
    """PNG text chunks: the parameters of `num_images` images from `seed` per caption of `prompts` (a list, or None
    for an unconditional model) and the command that makes them. `options` are sampling_options(args)."""
    bundled = args.unet_ckpt_path is None  # named relative to the repository, and implied by the command
    params = dict(checkpoint=f"{BUNDLED_MODELS.name}/{checkpoint.name} (bundled)" if bundled else str(checkpoint),
                  weights=pipeline.config.get("weights", "model"), seed=seed, num_images=num_images,
                  sampler=args.sampler, steps=options["steps"], spacing=args.spacing,
                  lower_order_final=args.lower_order_final, eta=args.eta, bf16=pipeline.bf16)
    command = ["python", "diffusion.py"] + ([] if bundled else ["--unet_ckpt_path", str(checkpoint)])
    if args.vqgan is not None:
        params["vqgan"] = str(args.vqgan)
        command += ["--vqgan", str(args.vqgan)]
    command += ["--seed", str(seed), "--num_images", str(num_images), "--sampler", args.sampler,
                "--steps", str(options["steps"]), "--spacing", args.spacing, "--eta", str(args.eta),
                "--device", args.device, "--precision", args.precision]
    command += [f"--{flag}" for flag in ("lower_order_final", "no_ema", "interpolate") if getattr(args, flag)]
    if args.interpolate_to is not None:
        command += ["--interpolate_to", str(args.interpolate_to)]
    if prompts is not None:
        params.update(prompt=prompts[0] if len(prompts) == 1 else prompts, negative_prompt=args.negative_prompt,
                      guidance_scale=args.guidance_scale, guidance_interval=args.guidance_interval,
                      guidance_high=args.guidance_high)
        command += ["--prompt", *prompts, "--guidance_scale", str(args.guidance_scale)]
        for flag in ("guidance_interval", "guidance_high"):
            if getattr(args, flag) is not None:
                command += [f"--{flag}", *map(str, getattr(args, flag))]
        if args.negative_prompt is not None:
            command += ["--negative_prompt", args.negative_prompt]
    if args.init_image is not None:
        params.update(init_image=str(args.init_image), strength=args.strength)
        command += ["--init_image", str(args.init_image), "--strength", str(args.strength)]
    if args.prior is not None:
        params.update(prior=args.prior)
        command += ["--prior", str(args.prior)]
    if args.like is not None:
        params.update(like=args.like, mix=like_mix(args))
        command += [arg for path in args.like for arg in ("--like", str(path))]
        command += ["--mix", str(args.mix)] if args.mix is not None else []
    if prompts is None and pipeline.unet.image_embed_dim is not None:  # guided against the null embedding
        params.update(guidance_scale=args.guidance_scale)
        command += ["--guidance_scale", str(args.guidance_scale)]
    return {"parameters": params, "command": shlex.join(command)}


def like_mix(args):
    """The blend of two --like paintings (0.5 unless --mix); None for one painting."""
    return None if args.like is None or len(args.like) < 2 else (0.5 if args.mix is None else args.mix)


def like_embedding(paths, mix, pipeline):
    """The image embedding 1 x E that --like asks for: one painting's, or the spherical blend of two's."""
    size = pipeline.latent_shape[1] * pipeline.vqgan.downsample_factor
    embeds = pipeline.embed_images(torch.cat([load_image(path, size, "--like image") for path in paths]))
    return embeds[:1] if len(paths) == 1 else slerp(embeds[0], embeds[1], mix)[None]


def interpolation_seeds(args):
    """The seeds of an interpolation's first and last frames."""
    return [args.seed, args.seed + 1 if args.interpolate_to is None else args.interpolate_to]


def image_parameters(args, checkpoint, pipeline, options, index, prompt):
    """Image `index` of a caption's row: alone it is seed + index with one image; an interpolation frame needs its
    row."""
    prompts = None if prompt is None else [prompt]
    if args.interpolate:
        chunks = run_parameters(args, checkpoint, pipeline, options, args.seed, args.num_images, prompts)
        chunks["parameters"].update(interpolate=dict(seeds=interpolation_seeds(args), frame=index))
        return chunks
    return run_parameters(args, checkpoint, pipeline, options, args.seed + index, 1, prompts)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    sampling_options(args)  # refuses bad sampling flags before the model loads
    checkpoint = args.unet_ckpt_path or default_checkpoint(args.prompt is not None, like=args.like is not None)
    if args.export:
        if args.prior == "none":
            raise UserError("--export --prior takes the path of the prior the copy should name")
        weights = export_diffusion_model(checkpoint, args.export, EXPORT_DTYPES[args.export_dtype], args.prior)
        print(f"wrote {weights} ({weights.stat().st_size / 2**20:.1f} MiB)")
        return 0
    outdir = check_output_folder(args.outdir, "--outdir")
    device = pick_device(args.device)
    prior = {} if args.prior is None else {"prior": None if args.prior == "none" else args.prior}
    pipeline = load_diffusion_model(checkpoint, device, use_ema=not args.no_ema, vqgan_path=args.vqgan,
                                    bf16=use_bf16(args.precision, device), channels_last=args.channels_last,
                                    compile=args.compile, **prior)
    paths, grid_path = sample_to_folder(args, checkpoint, pipeline, outdir)
    print(f"wrote {len(paths)} images {paths[0].name}..{paths[-1].name} and {grid_path.name} to {outdir}")
    return 0


def sample_to_folder(args, checkpoint, pipeline, outdir):
    """The sampling command's work once its model is loaded: the images parsed flags `args` ask of `pipeline`
    (loaded from `checkpoint`), each saved to `outdir` with its PNG text chunks, then their grid. Returns (image
    paths, grid path). studio.py calls it with the command line its widgets make, so both write the same files."""
    options = sampling_options(args, DEFAULT_STEPS if args.prompt else UNPROMPTED_STEPS)
    init_image = None
    if args.init_image is not None:
        args = argparse.Namespace(**{**vars(args), "strength": 0.75 if args.strength is None else args.strength})
        init_image = load_image(args.init_image, pipeline.latent_shape[1] * pipeline.vqgan.downsample_factor)
    if args.interpolate:
        ends = [randn((1, *pipeline.latent_shape), torch.Generator().manual_seed(seed))
                for seed in interpolation_seeds(args)]
        frames = torch.cat([slerp(*ends, i / (args.num_images - 1)) for i in range(args.num_images)])
    like = None if args.like is None else like_embedding(args.like, like_mix(args), pipeline)
    first = next_image_index(outdir)
    all_images, paths = [], []
    for prompt in args.prompt or [None]:  # one grid row per caption, each over the same seeds
        for start in range(0, args.num_images, args.batch_size):
            n = min(args.batch_size, args.num_images - start)
            images = pipeline.generate(
                n, args.seed + start, **options, prompt=prompt, negative_prompt=args.negative_prompt, eta=args.eta,
                strength=args.strength,
                init_images=None if init_image is None else init_image.expand(n, -1, -1, -1),
                noise=frames[start:start + n] if args.interpolate else None,
                image_embeds=None if like is None else like.expand(n, -1))
            for i, img in enumerate(tensor_to_images(images)):
                path = outdir / f"{first + len(paths):05d}.png"
                save_png(path, img, image_parameters(args, checkpoint, pipeline, options, start + i, prompt))
                paths.append(path)
                all_images.append(img)
    grid_path = outdir / GRID_NAME.format(first)
    grid_params = run_parameters(args, checkpoint, pipeline, options, args.seed, args.num_images, args.prompt)
    grid_params["files"] = [p.name for p in paths]
    row_each = args.interpolate or len(args.prompt or []) > 1  # a row per interpolation or per caption
    save_png(grid_path, make_grid(all_images, ncols=args.num_images if row_each else None), grid_params)
    return paths, grid_path


if __name__ == "__main__":
    run_cli(main)
