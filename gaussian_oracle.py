"""An exact denoiser for Gaussian data, to check samplers against a known answer.

For data x0 ~ N(mu, std^2) every quantity a sampler needs has a closed form, so a sampler's output can be compared
with the exact probability-flow solution instead of with another sampler. tests/test_diffusion.py checks the
samplers with it; experiments/sampler_oracle.py tabulates step spacings with it.
"""
import torch

from samplers import SAMPLERS, make_denoiser, sampling_timesteps
from schedule import NoiseSchedule, prediction_target

MU, STD = 0.5, 0.3  # the default Gaussian "data set"


def gaussian_oracle(schedule, prediction_type, mu=MU, std=STD):
    """The exact model for data x0 ~ N(mu, std^2): x_t ~ N(sqrt(a) mu, a std^2 + 1 - a), so
    E[x0 | x_t] = mu + sqrt(a) std^2 (x_t - sqrt(a) mu) / (a std^2 + 1 - a) and eps, v follow from it."""

    def model_fn(x_t, t):
        a = schedule.alpha_bar(t).to(x_t.dtype).reshape(-1, *[1] * (x_t.ndim - 1))
        x0 = mu + a.sqrt() * std**2 * (x_t - a.sqrt() * mu) / (a * std**2 + 1 - a)
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * std**2 + 1 - a)
        return eps if prediction_type == "epsilon" else prediction_target(x0, eps, schedule.alpha_bar(t), "v")

    return model_fn


def sample_gaussian(sampler, steps, prediction_type="epsilon", karras=False, schedule=None, mu=MU, std=STD,
                    **options):
    """Samples of the oracle for N(mu, std^2), from 4000 x 4 start noises (seed 0); returns (samples, start noise)."""
    schedule = schedule or NoiseSchedule("linear")
    denoiser = make_denoiser(gaussian_oracle(schedule, prediction_type, mu, std), schedule, prediction_type)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4000, 4, generator=generator, dtype=torch.float64)
    timesteps = sampling_timesteps(schedule, steps, karras)
    return SAMPLERS[sampler](denoiser, latents, schedule, timesteps, generator, **options), latents


def exact_flow(schedule, latents, mu=MU, std=STD):
    """Where the probability-flow ODE takes each start noise x_T for data N(mu, std^2): the standardised value
    (x_t - sqrt(a) mu) / sqrt(a std^2 + 1 - a) stays constant along every trajectory."""
    a = schedule.alphas_cumprod[-1].item()
    return mu + std * (latents - a**0.5 * mu) / (a * std**2 + 1 - a) ** 0.5
