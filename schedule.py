"""The forward process of diffusion: noise schedules (betas, alpha_bar), the maths between x0, eps, v and x_t (every
formula once), the training timesteps and the training loss.

Notation (Ho et al. 2020): alpha_bar = prod(1 - beta) over the first t+1 steps; x_t = sqrt(alpha_bar) x0 +
sqrt(1 - alpha_bar) eps. A model predicts eps or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans &
Ho 2022).
"""
import math

import numpy as np
import torch

from cli import UserError

PREDICTION_TYPES = ("epsilon", "v")
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}  # DDPM; latent diffusion

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
