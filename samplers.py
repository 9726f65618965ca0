"""The reverse process: timestep spacing (even, Karras, img2img's), start noise, the samplers DDPM, DDIM and
DPM-Solver++(2M), and classifier-free guidance. Samplers (k-diffusion style) take a `denoiser(x_t, t) -> x0` and a
descending list of timesteps, and step to alpha_bar = 1 (clean) after the last one.
"""
import math

import torch
from tqdm import trange

from cli import UserError
from schedule import check_prediction_type, predicted_eps, predicted_x0

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
