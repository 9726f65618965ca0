"""Diffusion maths checked against closed forms, samplers checked with an exact (analytic) denoiser on Gaussian
data, the checkpoint format, and the sampling command on a tiny random model."""
import json
import math
import os
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion
from cli import UserError
from devices import native_bf16
from diffusion import UNPROMPTED_STEPS, Pipeline, load_diffusion_model, save_diffusion_model
from gaussian_oracle import MU, STD, exact_flow, gaussian_oracle, sample_gaussian
from images import ImageSource, image_to_tensor
from samplers import (
    DEFAULT_STEPS, SAMPLERS, guidance_scales, guided_model_fn, img2img_timesteps, make_denoiser, randn,
    sampling_timesteps, slerp,
)
from schedule import NoiseSchedule, loss_weight, make_betas, predicted_eps, predicted_x0, prediction_target, q_sample
from unet import UNET_CONFIGS, UNet, mean_token
from vqgan import CONFIGS, VQModel, save_vqgan


def flow_error(sampler, steps, karras=False, schedule=None, prediction_type="epsilon"):
    """RMS distance, in units of the data std, between a deterministic sampler's output and the exact flow."""
    schedule = schedule or NoiseSchedule("linear")
    samples, latents = sample_gaussian(sampler, steps, prediction_type, karras, schedule)
    return ((samples - exact_flow(schedule, latents)).pow(2).mean().sqrt() / STD).item()


def assert_matches_data(samples, std_tolerance=0.03):
    # 0.02 = 4 % of the mean: the sample mean's own spread is 0.002 and a schedule whose last step is not pure
    # noise (scaled_linear: alpha_bar 0.005) shifts it by up to 0.016 (what zero-terminal-SNR rescaling removes)
    assert abs(samples.mean().item() - MU) < 0.02
    assert abs(samples.std().item() / STD - 1) < std_tolerance


# ----------------------------------------------------------------------------------------------
# Schedules and formulas


def test_linear_schedule_endpoints_and_monotone():
    schedule = NoiseSchedule("linear")
    assert len(schedule.betas) == 1000 and schedule.betas.dtype == torch.float64
    assert schedule.betas[0].item() == pytest.approx(1e-4) and schedule.betas[-1].item() == pytest.approx(0.02)
    for kind in ("linear", "scaled_linear", "cosine"):
        alphas_cumprod = NoiseSchedule(kind).alphas_cumprod
        assert (alphas_cumprod.diff() < 0).all() and 0 < alphas_cumprod[-1] < 0.01 < 0.99 < alphas_cumprod[0] < 1
    scaled = NoiseSchedule("scaled_linear")
    assert scaled.betas[0].item() == pytest.approx(0.00085) and scaled.betas[-1].item() == pytest.approx(0.012)
    assert scaled.betas[500].sqrt().item() == pytest.approx((0.00085**0.5 + 0.012**0.5) / 2, rel=1e-2)
    cosine = NoiseSchedule("cosine")
    t = torch.tensor(500.0)
    expected = math.cos((501 / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert cosine.alpha_bar(t).item() == pytest.approx(expected, rel=1e-9)


def test_an_explicit_beta_is_used_and_one_outside_0_1_is_refused():
    """0.0 is a value, not "unset" (it used to give the default range); betas outside (0, 1) would give NaN later."""
    assert make_betas("linear", 10, beta_end=0.5)[-1].item() == pytest.approx(0.5)
    for start, end in ((0.0, 0.02), (-0.1, 0.02), (1e-4, 1.0), (1e-4, 1.5)):
        for kind in ("linear", "scaled_linear"):
            with pytest.raises(UserError, match=r"beta_(start|end) must be in \(0, 1\)"):
                NoiseSchedule(kind, 10, start, end)


def test_zero_terminal_snr_schedule():
    plain, rescaled = NoiseSchedule("scaled_linear"), NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    assert rescaled.alphas_cumprod[-1].item() == 0
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    assert (rescaled.alphas_cumprod.diff() < 0).all()
    with pytest.raises(UserError, match="v prediction"):
        make_denoiser(lambda x, t: x, rescaled, "epsilon")


def test_alpha_bar_interpolates_and_inverts():
    schedule = NoiseSchedule("linear")
    assert schedule.alpha_bar(torch.tensor([0, 999])).tolist() == schedule.alphas_cumprod[[0, 999]].tolist()
    middle = schedule.alpha_bar(torch.tensor(10.5)).item()
    assert middle == pytest.approx((schedule.alphas_cumprod[10] + schedule.alphas_cumprod[11]).item() / 2)
    t = torch.tensor([0.0, 3.25, 500.5, 999.0], dtype=torch.float64)
    assert torch.allclose(schedule.timestep(schedule.alpha_bar(t)), t, atol=1e-6)


def test_q_sample_moments():
    schedule = NoiseSchedule("linear")
    x0 = torch.full((20000, 4), 2.0)
    t = torch.full((20000,), 300)
    x_t = schedule.q_sample(x0, t, torch.randn_like(x0, dtype=torch.float32, device="cpu"))
    a = schedule.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(2 * a**0.5, abs=0.01)
    assert x_t.std().item() == pytest.approx((1 - a) ** 0.5, rel=0.01)


def test_eps_x0_v_conversions_round_trip():
    torch.manual_seed(0)
    x0, noise = torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(6, 4, 3, 3, dtype=torch.float64)
    alpha_bar = NoiseSchedule("cosine", zero_terminal_snr=True).alpha_bar(torch.tensor([0, 1, 250, 500, 998, 999]))
    x_t = q_sample(x0, noise, alpha_bar)
    v = prediction_target(x0, noise, alpha_bar, "v")
    assert torch.allclose(predicted_x0(x_t, v, alpha_bar, "v"), x0, atol=1e-9)  # exact even at alpha_bar = 0
    assert torch.allclose(predicted_eps(x_t, x0, alpha_bar), noise, atol=1e-7)
    eps = prediction_target(x0, noise, alpha_bar, "epsilon")
    assert torch.equal(eps, noise)
    finite = alpha_bar > 0
    assert torch.allclose(predicted_x0(x_t, eps, alpha_bar, "epsilon")[finite], x0[finite], atol=1e-6)
    # v = sqrt(a) eps - sqrt(1 - a) x0, written out
    a = alpha_bar.reshape(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_loss_weights_min_snr():
    alpha_bar = torch.tensor([0.0, 0.5, 5 / 6, 0.99], dtype=torch.float64)  # SNR 0, 1, 5, 99
    assert loss_weight(alpha_bar, "epsilon", 5.0).tolist() == pytest.approx([1, 1, 1, 5 / 99])
    assert loss_weight(alpha_bar, "v", 5.0).tolist() == pytest.approx([0, 1 / 2, 5 / 6, 5 / 100])
    assert loss_weight(alpha_bar, "v").tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_training_loss_targets_and_min_snr(prediction_type):
    """A model whose x0 estimate is off by delta costs snr * delta^2 (eps) or (snr + 1) delta^2 (v); with min-SNR
    weighting both become min(snr, gamma) delta^2."""
    schedule = NoiseSchedule("linear")
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([5, 100, 400, 900])
    alpha_bar = schedule.alpha_bar(t)

    def perfect(x_t, t_):
        assert torch.equal(t_, t)
        return prediction_target(x0, noise, alpha_bar, prediction_type)

    assert schedule.training_loss(perfect, x0, prediction_type, t=t, noise=noise).item() < 1e-10
    delta = 0.1

    def off_by_delta(x_t, t_):
        x0_hat = x0 + delta
        return prediction_target(x0_hat, predicted_eps(x_t, x0_hat, alpha_bar), alpha_bar, prediction_type)

    snr = alpha_bar / (1 - alpha_bar)
    plain = schedule.training_loss(off_by_delta, x0, prediction_type, t=t, noise=noise).item()
    expected = (snr if prediction_type == "epsilon" else snr + 1).mean().item() * delta**2
    assert plain == pytest.approx(expected, rel=1e-3)
    weighted = schedule.training_loss(off_by_delta, x0, prediction_type, min_snr_gamma=5.0, t=t, noise=noise).item()
    assert weighted == pytest.approx(snr.clamp(max=5).mean().item() * delta**2, rel=1e-3)


def test_training_loss_draws_t_and_noise_and_backpropagates():
    """t and eps drawn inside: the noise is read back from the x_t the model sees (through alpha_bar built here from
    Ho et al.'s betas), and the loss and its gradient are recomputed from it by hand: min(SNR, 5) / (SNR + 1) times
    the MSE to v = sqrt(a) eps - sqrt(1 - a) x0. The draws are fresh N(0, 1) noise and timesteps across [0, T)."""
    schedule = NoiseSchedule("linear")
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.manual_seed(0)
    x0 = torch.randn(64, 4, 4, 4)
    weight = torch.tensor(0.3, requires_grad=True)
    seen = []

    def model_fn(x_t, t):
        seen.append((x_t.detach().double(), torch.as_tensor(t, dtype=torch.float64)))
        return weight * x_t

    loss = schedule.training_loss(model_fn, x0, "v", min_snr_gamma=5.0)
    loss.backward()
    x_t, t = seen[0]
    assert t.min() >= 0 and t.max() <= 999 and t.min() < 200 and t.max() > 800 and len(t.unique()) > 48
    a = torch.from_numpy(np.interp(t.numpy(), np.arange(1000), alphas_cumprod.numpy()))[:, None, None, None]
    noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    assert abs(noise.mean().item()) < 0.05 and noise.std().item() == pytest.approx(1, abs=0.05)
    assert abs((noise * x0).mean().item()) < 0.05  # independent of the data
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    snr = (a / (1 - a)).flatten()
    loss_weights = snr.clamp(max=5) / (snr + 1)
    error = 0.3 * x_t - v
    assert loss.item() == pytest.approx((loss_weights * error.pow(2).flatten(1).mean(1)).mean().item(), rel=1e-4)
    expected_grad = (loss_weights * (2 * error * x_t).flatten(1).mean(1)).mean().item()
    assert weight.grad.item() == pytest.approx(expected_grad, rel=1e-4)
    schedule.training_loss(model_fn, x0, "v", min_snr_gamma=5.0)
    assert not torch.equal(seen[1][1], t) and not torch.allclose(seen[1][0], x_t)  # each call draws anew



def log_snr_of(schedule, t):
    alpha_bar = schedule.alpha_bar(t)
    return (alpha_bar / (1 - alpha_bar)).log()


def normal_cdf(x, mean, std):
    return 0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2))))


def laplace_cdf(x, loc, scale):
    return 0.5 * math.exp((x - loc) / scale) if x < loc else 1 - 0.5 * math.exp(-(x - loc) / scale)


@pytest.mark.parametrize("kind,loc,scale,cdf,mean,std", [
    ("logit-normal", 0.5, 0.8, lambda x: normal_cdf(x, -1.0, 1.6), -1.0, 1.6),  # lambda = -2 logit(t)
    ("logit-normal", None, None, lambda x: normal_cdf(x, 0.0, 2.0), 0.0, 2.0),   # SD3's default m = 0, s = 1
    ("laplace", 1.0, 0.5, lambda x: laplace_cdf(x, 1.0, 0.5), 1.0, 0.5 * math.sqrt(2)),
    ("laplace", None, None, lambda x: laplace_cdf(x, 0.0, 0.5), 0.0, 0.5 * math.sqrt(2)),  # Hang et al.'s 0, 0.5
])
def test_timestep_samplers_hit_their_log_snr_distribution(kind, loc, scale, cdf, mean, std):
    """The log-SNR of the drawn (fractional) timesteps, read back through the schedule, has the target's mean,
    std and CDF: the samples are right and NoiseSchedule.timestep inverts alpha_bar."""
    schedule = NoiseSchedule("scaled_linear", beta_start=0.0015, beta_end=0.0195)  # the bundled models' schedule
    torch.manual_seed(0)
    t = schedule.training_timesteps(20000, kind, loc, scale)
    assert t.dtype == torch.float32 and ((t > 0) & (t < 999)).double().mean() > 0.998  # a few land on the ends
    assert not torch.equal(t, t.round())
    log_snr = log_snr_of(schedule, t)
    assert log_snr.mean().item() == pytest.approx(mean, abs=0.04)
    assert log_snr.std().item() == pytest.approx(std, rel=0.03)
    for x in np.linspace(mean - 2 * std, mean + 2 * std, 9):
        assert (log_snr <= x).double().mean().item() == pytest.approx(cdf(x), abs=0.012)


def test_uniform_timesteps_are_the_old_draw_and_log_snrs_beyond_the_schedule_land_on_its_ends():
    schedule = NoiseSchedule("linear")
    torch.manual_seed(3)
    uniform = schedule.training_timesteps(500)
    torch.manual_seed(3)
    assert torch.equal(uniform, torch.randint(0, 1000, (500,)))  # what training_loss draws itself
    counts = torch.bincount(uniform // 100, minlength=10)
    assert counts.min() > 25 and counts.max() < 75
    assert torch.equal(schedule.training_timesteps(50, "laplace", 30.0, 0.5), torch.zeros(50))
    assert torch.equal(schedule.training_timesteps(50, "laplace", -30.0, 0.5), torch.full((50,), 999.0))
    with pytest.raises(UserError, match="unknown timestep sampling 'beta'"):
        schedule.training_timesteps(4, "beta")


def test_focused_timesteps_compose_with_min_snr():
    """A training loss at logit-normal timesteps with min-SNR weighting: each sample is weighted by its own
    alpha_bar (the fractional t's), as with uniform timesteps."""
    schedule = NoiseSchedule("linear")
    torch.manual_seed(1)
    t = schedule.training_timesteps(64, "logit-normal")
    x0, noise, delta = torch.randn(64, 4, 2, 2), torch.randn(64, 4, 2, 2), 0.1
    alpha_bar = schedule.alpha_bar(t)

    def off_by_delta(x_t, t_seen):
        assert torch.equal(t_seen, t)
        return noise + delta  # eps error delta everywhere: x0 error delta / sqrt(SNR)

    snr = alpha_bar / (1 - alpha_bar)
    weighted = schedule.training_loss(off_by_delta, x0, "epsilon", min_snr_gamma=5.0, t=t, noise=noise).item()
    assert weighted == pytest.approx((5 / snr).clamp(max=1).mean().item() * delta**2, rel=1e-3)


# ----------------------------------------------------------------------------------------------
# Samplers with the exact denoiser: every sampler reproduces the data distribution


# The spacing each sampler's accuracy test below checks; test_each_sampler_defaults_to_the_spacing_its_accuracy_test_
# checks holds Pipeline's defaults to it.
TESTED_KARRAS = {"ddpm": False, "ddim": False, "dpmpp-2m": True}


def test_ddpm_1000_steps_matches_data():
    assert_matches_data(sample_gaussian("ddpm", 1000, karras=TESTED_KARRAS["ddpm"])[0], std_tolerance=0.02)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_dpmpp_2m_karras_few_steps_matches_data(kind, prediction_type):
    schedule = NoiseSchedule(kind)
    samples, latents = sample_gaussian("dpmpp-2m", 25, prediction_type, karras=True, schedule=schedule)
    assert_matches_data(samples, std_tolerance=0.05)
    assert ((samples - exact_flow(schedule, latents)).pow(2).mean().sqrt() / STD).item() < 0.04


@pytest.mark.parametrize("sampler,karras,options", [
    ("ddim", False, {}), ("ddim", True, {}), ("dpmpp-2m", False, {}), ("ddpm", False, {}),
    ("ddim", False, {"eta": 0.5}),
])
def test_25_steps_keep_the_mean_and_roughly_the_std(sampler, karras, options):
    """At 25 steps on this narrow Gaussian (std 0.3 against unit noise) first-order DDIM shrinks the std by up to
    16 % and DPM-Solver++ on evenly spaced steps overshoots by up to 26 %: discretisation error, which the
    convergence tests below pin down. The mean is right at any step count."""
    samples, _ = sample_gaussian(sampler, 25, karras=karras, **options)
    assert_matches_data(samples, std_tolerance=0.3)


@pytest.mark.parametrize("sampler,karras", [("ddim", False), ("ddim", True), ("dpmpp-2m", False), ("dpmpp-2m", True)])
def test_v_prediction_gives_the_same_samples(sampler, karras):
    eps_samples, _ = sample_gaussian(sampler, 12, "epsilon", karras)
    v_samples, _ = sample_gaussian(sampler, 12, "v", karras)
    assert torch.allclose(eps_samples, v_samples, atol=1e-6)


def test_ddim_converges_to_the_exact_flow_at_first_order():
    errors = [flow_error("ddim", steps, karras=TESTED_KARRAS["ddim"]) for steps in (50, 100, 200)]
    assert errors[-1] < 0.03
    assert all(1.7 < coarse / fine < 2.3 for coarse, fine in zip(errors, errors[1:]))  # halving per doubling


def test_dpmpp_2m_converges_to_the_exact_flow_at_second_order():
    errors = [flow_error("dpmpp-2m", steps) for steps in (100, 200)]
    assert errors[-1] < 0.01 and errors[0] / errors[1] > 3.5  # ~4x per doubling
    assert flow_error("dpmpp-2m", 50, karras=TESTED_KARRAS["dpmpp-2m"]) < 0.01


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 100), ("dpmpp-2m", 100)])
def test_zero_terminal_snr_sampling_with_v_prediction(sampler, steps):
    """The first step sees alpha_bar = 0: x0 = -v there, so sampling stays finite and lands on the data."""
    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    samples, _ = sample_gaussian(sampler, steps, "v", schedule=schedule)
    assert torch.isfinite(samples).all()
    assert_matches_data(samples, std_tolerance=0.06)


def test_ddim_eta_1_equals_ddpm():
    """DDIM with eta = 1 is the DDPM posterior step (Song et al. 2021), here checked with identical noise."""
    ddpm, _ = sample_gaussian("ddpm", 10)
    ddim, _ = sample_gaussian("ddim", 10, eta=1.0)
    assert torch.allclose(ddpm, ddim, atol=1e-10)


def test_sampling_timesteps():
    schedule = NoiseSchedule("linear")
    timesteps = sampling_timesteps(schedule, 5)
    assert timesteps.tolist() == [999, 749, 500, 250, 0]  # linspace(999, 0), rounded
    assert sampling_timesteps(schedule, 1).tolist() == [999]
    assert sampling_timesteps(schedule, 1000).tolist() == list(range(999, -1, -1))
    karras = sampling_timesteps(schedule, 10, karras=True)
    assert karras[0].item() == pytest.approx(999) and karras[-1].item() == pytest.approx(0, abs=1e-9)
    alpha_bar = schedule.alpha_bar(karras)
    sigma_root = ((1 - alpha_bar) / alpha_bar) ** (1 / 14)  # sigma^(1/7), evenly spaced by construction
    assert torch.allclose(sigma_root.diff(), sigma_root.diff()[:1].expand(9), rtol=1e-6)
    assert (karras.diff() < 0).all()
    with pytest.raises(UserError, match="steps"):
        sampling_timesteps(schedule, 0)
    with pytest.raises(UserError, match="Karras"):
        sampling_timesteps(NoiseSchedule("linear", zero_terminal_snr=True), 10, karras=True)


def test_per_row_generators_make_rows_independent_of_the_batch():
    schedule = NoiseSchedule("linear")
    denoiser = make_denoiser(gaussian_oracle(schedule, "epsilon"), schedule, "epsilon")
    timesteps = sampling_timesteps(schedule, 8)

    def run(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        latents = randn((len(seeds), 4, 2, 2), generators)
        return SAMPLERS["ddpm"](denoiser, latents, schedule, timesteps, generators)

    batch = run([7, 8, 9])
    assert torch.equal(run([8])[0], batch[1])
    assert not torch.equal(batch[0], batch[1])


def test_guidance_scale_one_is_the_conditional_prediction():
    calls = []

    def unet(x, t, context, mask):
        calls.append(x.shape[0])
        return x * context.mean((1, 2))[:, None, None, None] + mask.float().sum(1)[:, None, None, None]

    x, t = torch.randn(2, 4, 3, 3), torch.tensor([10.0, 10.0])
    cond, cond_mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    uncond, uncond_mask = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    exact = unet(x, t, cond, cond_mask)
    calls.clear()
    assert torch.equal(guided_model_fn(unet, cond, cond_mask, uncond, uncond_mask, 1.0)(x, t), exact)
    guided = guided_model_fn(unet, cond, cond_mask, uncond, uncond_mask, 3.0)(x, t)
    assert calls == [2, 4]  # scale 3: one batched pass with both branches
    expected = unet(x, t, uncond, uncond_mask) + 3.0 * (exact - unet(x, t, uncond, uncond_mask))
    assert torch.allclose(guided, expected, atol=1e-6)


def test_slerp_endpoints_and_norm():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    b = b * a.norm() / b.norm()
    middle = slerp(a, b, 0.5)
    assert middle.norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
    assert ((a + b) / 2).norm() < 0.8 * a.norm()  # a straight line would shrink it
    assert torch.allclose(slerp(a, a, 0.3), a)


# ----------------------------------------------------------------------------------------------
# Checkpoints, Pipeline and the sampling command, on a tiny random model (4x8x8 latents, 32x32 images)


def tiny_unet(context_dim=None):
    """The tiny UNet with its zero-initialised layers given small random values (as if briefly trained)."""
    torch.manual_seed(0)
    unet = UNet(**{**UNET_CONFIGS["tiny"], "sample_size": 8, "attention_resolutions": [8], "context_dim": context_dim})
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return unet.eval()


def write_checkpoint(folder, context_dim=None, embed_vqgan=False, prediction_type="v", dtype=None):
    """A diffusion checkpoint whose EMA weights differ slightly from its raw ones."""
    torch.manual_seed(0)
    vqgan = VQModel(CONFIGS["vq-f4-tiny"]).eval()
    unet = tiny_unet(context_dim)
    ema_state = {k: v + 0.01 * torch.randn_like(v) for k, v in unet.state_dict().items()}
    config = dict(unet=unet.config, schedule=NoiseSchedule("linear").config, prediction_type=prediction_type,
                  latent_shape=[4, 8, 8], latent_scale=0.7, max_text_length=8, training={"steps": 0},
                  text_encoder="sentence-transformers/all-MiniLM-L6-v2" if context_dim else None)
    if not embed_vqgan:
        save_vqgan(vqgan, folder / "vqgan")
    save_diffusion_model(folder / "unet", unet.state_dict(), ema_state, config,
                         vqgan=vqgan if embed_vqgan else folder / "vqgan", dtype=dtype)
    return folder / "unet"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


def png_text(path):
    with Image.open(path) as img:
        return dict(img.text), img.size


def pixels(path):
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy())


def run(checkpoint, outdir, *flags):
    return diffusion.main(["--unet_ckpt_path", str(checkpoint), "--outdir", str(outdir), *map(str, flags)])


def test_checkpoint_round_trip_ema_fp16_and_relative_vqgan(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "a", dtype=torch.float16)
    config = json.loads(path.with_suffix(".json").read_text())
    assert config["model"] == "noise2art-unet" and config["vqgan"] == "vqgan"  # relative to the checkpoint
    from safetensors.torch import load_file

    stored = load_file(str(path.with_suffix(".safetensors")))
    assert {k.split(".")[0] for k in stored} == {"model", "ema"}
    assert all(v.dtype == torch.float16 for v in stored.values())
    monkeypatch.chdir(tmp_path)  # the VQGAN is found relative to the checkpoint, not the working directory
    ema = load_diffusion_model("a/unet.json", "cpu")
    raw = load_diffusion_model("a/unet.safetensors", "cpu", use_ema=False)
    assert ema.config["weights"] == "ema" and raw.config["weights"] == "model"
    weight = "conv_in.weight"
    assert ema.unet.state_dict()[weight].dtype == torch.float32
    assert torch.equal(ema.unet.state_dict()[weight], stored[f"ema.{weight}"].float())
    assert not torch.equal(ema.unet.state_dict()[weight], raw.unet.state_dict()[weight])
    assert not ema.unet.training and ema.latent_shape == (4, 8, 8) and ema.latent_scale == 0.7


def test_export_keeps_ema_weights_in_fp16_and_finds_the_vqgan_from_its_new_place(tmp_path, checkpoint, capsys):
    assert run(checkpoint, tmp_path, "--export", tmp_path / "bundle" / "unet-small") == 0
    assert "unet-small.safetensors" in capsys.readouterr().out
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "bundle" / "unet-small.safetensors"))
    assert {k.split(".")[0] for k in stored} == {"ema"} and all(v.dtype == torch.float16 for v in stored.values())
    config = json.loads((tmp_path / "bundle" / "unet-small.json").read_text())
    assert config["vqgan"] == os.path.relpath(checkpoint.parent / "vqgan", tmp_path / "bundle")
    exported, original = load_diffusion_model(tmp_path / "bundle" / "unet-small"), load_diffusion_model(checkpoint)
    assert exported.config["weights"] == "ema" and exported.config["training"] == original.config["training"]
    for name, value in original.unet.state_dict().items():
        assert torch.equal(exported.unet.state_dict()[name], value.half().float()), name
    with pytest.raises(UserError, match="holds only EMA weights"):
        load_diffusion_model(tmp_path / "bundle" / "unet-small", use_ema=False)
    images = [run(path, tmp_path / name, "--num_images", 1, "--steps", 2) for name, path in
              (("a", checkpoint), ("b", tmp_path / "bundle" / "unet-small"))]
    assert images == [0, 0] and (pixels(tmp_path / "a" / "00000.png").float()
                                 - pixels(tmp_path / "b" / "00000.png").float()).abs().mean() < 2


def test_embedded_vqgan_and_in_memory_pipeline_agree(tmp_path, checkpoint):
    embedded = load_diffusion_model(write_checkpoint(tmp_path, embed_vqgan=True), "cpu")
    assert json.loads((tmp_path / "unet.json").read_text())["vqgan"] is None and not (tmp_path / "vqgan.json").exists()
    loaded = load_diffusion_model(checkpoint, "cpu")
    options = dict(sampler="ddim", steps=3, progress=False)
    assert torch.equal(embedded.generate(2, seed=1, **options), loaded.generate(2, seed=1, **options))
    # what the trainer does: a Pipeline straight from objects in memory, no files
    in_memory = Pipeline(loaded.unet, NoiseSchedule("linear"), loaded.vqgan, {"prediction_type": "v",
                                                                                "latent_scale": 0.7})
    assert in_memory.latent_shape == (4, 8, 8)
    assert torch.equal(in_memory.generate(2, seed=1, **options), loaded.generate(2, seed=1, **options))


def test_channels_last_is_the_default_layout_and_draws_the_same_images(checkpoint):
    fast = load_diffusion_model(checkpoint, "cpu")
    plain = load_diffusion_model(checkpoint, "cpu", channels_last=False)
    for pipeline, layout in ((fast, torch.channels_last), (plain, torch.contiguous_format)):
        for model in (pipeline.unet, pipeline.vqgan.decoder):
            assert all(p.is_contiguous(memory_format=layout) for p in model.parameters() if p.dim() == 4)
    options = dict(sampler="dpmpp-2m", steps=3, progress=False)
    assert torch.allclose(fast.generate(2, seed=1, **options), plain.generate(2, seed=1, **options), atol=1e-4)


def test_cli_writes_images_grid_and_metadata(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    assert run(checkpoint, out, "--num_images", 3, "--batch_size", 2, "--sampler", "ddim", "--steps", 3,
               "--seed", 5) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "grid-00000.png"]
    assert str(out) in capsys.readouterr().out
    text, size = png_text(out / "00001.png")
    assert size == (32, 32)
    params = json.loads(text["parameters"])
    assert params["seed"] == 6 and params["num_images"] == 1 and params["sampler"] == "ddim" and params["steps"] == 3
    assert params["checkpoint"] == str(checkpoint) and params["weights"] == "ema" and params["eta"] == 0.0
    assert "--seed 6 --num_images 1" in text["command"]
    grid_text, grid_size = png_text(out / "grid-00000.png")
    assert grid_size == (64, 64) and json.loads(grid_text["parameters"])["seed"] == 5
    assert json.loads(grid_text["files"]) == ["00000.png", "00001.png", "00002.png"]
    # a second run into the same folder adds files instead of overwriting
    assert run(checkpoint, out, "--num_images", 1, "--steps", 2) == 0
    assert (out / "00003.png").is_file() and (out / "grid-00003.png").is_file()


def test_unprompted_sampling_takes_ten_steps_by_default(tmp_path, checkpoint):
    """Without --prompt diffusion.py's dpmpp-2m default is 10 steps (guided sampling keeps 20: the prompt test
    below), and the PNG says so; evaluate.py's protocol stays at 20 (tests/test_evaluate.py)."""
    assert run(checkpoint, tmp_path, "--num_images", 1) == 0
    text = png_text(tmp_path / "00000.png")[0]
    assert json.loads(text["parameters"])["steps"] == UNPROMPTED_STEPS["dpmpp-2m"] == 10
    assert "--steps 10" in text["command"] and DEFAULT_STEPS["dpmpp-2m"] == 20
    assert run(checkpoint, tmp_path, "--num_images", 1, "--sampler", "ddim") == 0  # the other samplers keep theirs
    assert json.loads(png_text(tmp_path / "00001.png")[0]["parameters"])["steps"] == DEFAULT_STEPS["ddim"]


def test_a_folder_written_by_diffusion_py_reads_as_exactly_its_images(tmp_path, checkpoint):
    """evaluate.py --fake samples (and any folder reader) must not count the grids as samples."""
    out = tmp_path / "out"
    assert run(checkpoint, out, "--num_images", 3, "--steps", 1) == 0
    assert run(checkpoint, out, "--num_images", 2, "--steps", 1) == 0  # two runs, two grids
    assert len(list(out.glob("grid-*.png"))) == 2
    source = ImageSource(out)
    assert [source.metadata(i) for i in range(len(source))] == [{}] * 5
    assert [source.image(i).size for i in range(len(source))] == [(32, 32)] * 5  # no 64 x 64 mosaic among them


@pytest.mark.parametrize("outdir", ["taken", "taken/sub"])
def test_an_outdir_that_cannot_be_a_folder_fails_before_any_work(tmp_path, checkpoint, monkeypatch, outdir):
    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr(diffusion, "load_diffusion_model", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(UserError, match=f"--outdir {tmp_path / outdir}: .*taken is a file, not a folder"):
        run(checkpoint, tmp_path / outdir, "--num_images", 1, "--steps", 1)


def test_same_seed_same_images_and_any_image_alone(tmp_path, checkpoint):
    flags = ("--num_images", 3, "--batch_size", 3, "--sampler", "ddpm", "--steps", 4, "--seed", 11)
    run(checkpoint, tmp_path / "a", *flags)
    run(checkpoint, tmp_path / "b", *flags)
    for i in range(3):
        assert torch.equal(pixels(tmp_path / "a" / f"{i:05d}.png"), pixels(tmp_path / "b" / f"{i:05d}.png"))
    assert not torch.equal(pixels(tmp_path / "a" / "00000.png"), pixels(tmp_path / "a" / "00001.png"))
    # image 2 again, alone, from the command stored in its PNG (ancestral noise included)
    command = shlex.split(png_text(tmp_path / "a" / "00002.png")[0]["command"])
    assert command[:2] == ["python", "diffusion.py"]
    assert diffusion.main(command[2:] + ["--outdir", str(tmp_path / "alone")]) == 0
    alone, batched = pixels(tmp_path / "alone" / "00000.png"), pixels(tmp_path / "a" / "00002.png")
    assert (alone.int() - batched.int()).abs().max() <= 1  # batched vs single matmuls may round differently


@pytest.mark.parametrize("flags", [("--sampler", "dpmpp-2m", "--spacing", "even", "--lower_order_final"),
                                   ("--sampler", "ddim", "--eta", 0.5),
                                   ("--no_ema", "--precision", "bf16", "--no-channels_last")])
def test_cli_sampler_options(tmp_path, checkpoint, flags):
    assert run(checkpoint, tmp_path, "--num_images", 2, "--steps", 3, *flags) == 0
    params = json.loads(png_text(tmp_path / "00001.png")[0]["parameters"])
    auto_bf16 = "--precision" not in flags and native_bf16(torch.device("cpu"))  # auto: bf16 on CPUs where it pays
    assert params["spacing"] == ("even" if "even" in flags else "auto")
    assert params["bf16"] == ("bf16" in flags or auto_bf16)
    assert params["lower_order_final"] == ("--lower_order_final" in flags)
    assert params["weights"] == ("model" if "--no_ema" in flags else "ema")


def test_lower_order_final_makes_the_last_steps_first_order():
    """With 3 timesteps every update of dpmpp-2m is first order once the step into the last timestep is: DDIM."""
    ddim, _ = sample_gaussian("ddim", 3)
    assert torch.allclose(sample_gaussian("dpmpp-2m", 3, lower_order_final=True)[0], ddim, atol=1e-12)
    assert not torch.allclose(sample_gaussian("dpmpp-2m", 3)[0], ddim, atol=1e-3)


def test_karras_spacing_fixes_the_oversized_last_step():
    """Exact denoiser, unit-variance Gaussian data, the bundled models' schedule, 20 steps: evenly spaced steps end
    on a step ~5x longer in lambda than the one before and the second-order update overshoots (output std ~10 %
    too wide); Karras spacing (the default) lands within 4 %."""
    schedule = NoiseSchedule("scaled_linear", beta_start=0.0015, beta_end=0.0195)
    even, _ = sample_gaussian("dpmpp-2m", 20, schedule=schedule, mu=0.0, std=1.0)
    karras, _ = sample_gaussian("dpmpp-2m", 20, karras=True, schedule=schedule, mu=0.0, std=1.0)
    assert even.std().item() > 1.07 and abs(karras.std().item() - 1) < 0.04


def test_guidance_interval_guides_only_inside_its_noise_range():
    calls = []

    def unet(x, t, context, mask):
        calls.append(x.shape[0])
        return x * context.mean((1, 2))[:, None, None, None]

    schedule = NoiseSchedule("linear")
    scale_at = guidance_scales(schedule, 3.0, (0.5, 5.0))
    sigma = lambda t: ((1 - schedule.alpha_bar(t)) / schedule.alpha_bar(t)).sqrt().item()  # noqa: E731
    inside, below = torch.tensor([300.0, 300.0]), torch.tensor([20.0, 20.0])
    assert 0.5 < sigma(inside[:1]) <= 5.0 and sigma(below[:1]) <= 0.5
    assert scale_at(inside) == 3.0 and scale_at(below) == 1.0
    x = torch.randn(2, 4, 3, 3)
    cond, cond_mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    uncond, uncond_mask = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    model_fn = guided_model_fn(unet, cond, cond_mask, uncond, uncond_mask, scale_at)
    assert torch.equal(model_fn(x, below), unet(x, below, cond, cond_mask))  # outside: conditional alone
    calls.clear()
    model_fn(x, inside)
    assert calls == [4]  # inside: both branches in one pass
    assert guidance_scales(schedule, 3.0)(below) == 3.0  # no interval: everywhere
    assert guidance_scales(NoiseSchedule("linear", zero_terminal_snr=True), 3.0, (0.5, 5.0))(torch.tensor([999.0])) == 3


def test_guidance_high_replaces_the_scale_above_its_noise_level():
    schedule = NoiseSchedule("linear")
    sigma = lambda t: ((1 - schedule.alpha_bar(t)) / schedule.alpha_bar(t)).sqrt().item()  # noqa: E731
    low_t, mid_t, high_t = torch.tensor([20.0]), torch.tensor([300.0]), torch.tensor([900.0])
    assert sigma(low_t) <= 0.5 < sigma(mid_t) <= 5.0 < sigma(high_t)
    scale_at = guidance_scales(schedule, 3.0, (0.5, float("inf")), high=(6.0, 5.0))
    assert [scale_at(t) for t in (low_t, mid_t, high_t)] == [1.0, 3.0, 6.0]
    # the interval still bounds it: above SIGMA_HIGH no guidance at all
    assert guidance_scales(schedule, 3.0, (0.5, 5.0), high=(6.0, 1.0))(high_t) == 1.0
    # scale 1 below the split: only the high noise levels take the second (batched) branch
    calls = []

    def unet(x, t, context, mask):
        calls.append(x.shape[0])
        return x * context.mean((1, 2))[:, None, None, None]

    x = torch.randn(2, 4, 3, 3)
    cond, cond_mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    uncond, uncond_mask = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    model_fn = guided_model_fn(unet, cond, cond_mask, uncond, uncond_mask, guidance_scales(schedule, 1.0,
                                                                                           high=(6.0, 5.0)))
    high, mid = model_fn(x, high_t.expand(2)), model_fn(x, mid_t.expand(2))
    assert calls == [4, 2]
    cond_out, uncond_out = unet(x, high_t, cond, cond_mask), unet(x, high_t, uncond, uncond_mask)
    assert torch.allclose(high, uncond_out + 6.0 * (cond_out - uncond_out), atol=1e-6)
    assert torch.equal(mid, unet(x, mid_t, cond, cond_mask))


def test_img2img(tmp_path, checkpoint):
    from conftest import make_painting

    make_painting(3, size=(48, 32)).save(tmp_path / "init.png")
    pipeline = load_diffusion_model(checkpoint, "cpu")
    init = diffusion.load_image(tmp_path / "init.png", 32)
    assert init.shape == (1, 3, 32, 32)
    init_latents = pipeline.encode(init)
    options = dict(init_images=init.expand(2, -1, -1, -1), sampler="ddim", steps=20, progress=False)
    light = pipeline.sample_latents(2, seed=0, strength=0.01, **options)  # noised to timestep 10 of 1000
    full = pipeline.sample_latents(2, seed=0, strength=1.0, **options)
    light_error, full_error = (light - init_latents).abs().mean(), (full - init_latents).abs().mean()
    assert light_error < 0.5 * init_latents.abs().mean() and light_error < full_error / 5  # an untrained model
    assert run(checkpoint, tmp_path / "out", "--init_image", tmp_path / "init.png", "--strength", 0.5,
               "--num_images", 2, "--steps", 4) == 0
    params = json.loads(png_text(tmp_path / "out" / "00000.png")[0]["parameters"])
    assert params["strength"] == 0.5 and params["init_image"] == str(tmp_path / "init.png")


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_each_sampler_defaults_to_the_spacing_its_accuracy_test_checks(sampler, checkpoint, monkeypatch):
    """Without --spacing, Pipeline gives each sampler the timesteps its accuracy test above uses (ddpm's 1000-step
    ancestral chain on the trained integer timesteps, not fractional Karras ones), for text-to-image and img2img."""
    seen = []
    monkeypatch.setitem(SAMPLERS, sampler,
                        lambda denoiser, latents, schedule, timesteps, *_, **__: seen.append(timesteps) or latents)
    pipeline = load_diffusion_model(checkpoint, "cpu")
    pipeline.sample_latents(1, sampler=sampler, steps=10, progress=False)
    pipeline.sample_latents(1, sampler=sampler, steps=10, progress=False, init_images=torch.zeros(1, 3, 32, 32),
                            strength=0.5)
    karras = TESTED_KARRAS[sampler]
    assert torch.equal(seen[0], sampling_timesteps(pipeline.schedule, 10, karras))
    assert torch.equal(seen[1], img2img_timesteps(pipeline.schedule, 10, karras, 0.5))


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.5, 1.0])
def test_img2img_strength_is_one_noise_level_under_every_spacing(strength):
    """strength names the timestep round(strength * (T - 1)) the image is noised to, under even and Karras spacing
    alike (as a fraction of the steps it meant sigma 4.1 under Karras and 2.8 under even spacing at 0.5 and 20
    steps); the steps from there follow the spacing down to timestep 0."""
    schedule = NoiseSchedule("scaled_linear", beta_start=0.0015, beta_end=0.0195)
    even, karras = (img2img_timesteps(schedule, 20, spacing, strength) for spacing in (False, True))
    assert even[0].item() == pytest.approx(round(strength * 999)) and karras[0].item() == pytest.approx(even[0].item())
    assert len(even) == len(karras) == max(1, round(strength * 20))
    if len(karras) > 1:
        assert torch.equal(even, even.round()) and (karras.diff() < 0).all()
        assert even[-1] == 0 and karras[-1].item() == pytest.approx(0, abs=1e-6)
        sigmas = ((1 - schedule.alpha_bar(karras)) / schedule.alpha_bar(karras)).sqrt() ** (1 / 7)
        assert torch.allclose(sigmas.diff(), sigmas.diff()[:1].expand(len(karras) - 1))  # even in sigma^(1/7)
    with pytest.raises(UserError, match=r"strength must be in \(0, 1\], got 0"):
        img2img_timesteps(schedule, 20, False, 0)


def test_interpolate_runs_from_seed_to_seed_plus_one(tmp_path, checkpoint):
    assert run(checkpoint, tmp_path / "frames", "--interpolate", "--num_images", 4, "--batch_size", 3,
               "--sampler", "ddim", "--steps", 3, "--seed", 20) == 0
    assert png_text(tmp_path / "frames" / "grid-00000.png")[1] == (4 * 32, 32)  # one row
    params = json.loads(png_text(tmp_path / "frames" / "00002.png")[0]["parameters"])
    assert params["interpolate"] == {"seeds": [20, 21], "frame": 2}
    assert run(checkpoint, tmp_path / "ends", "--num_images", 2, "--sampler", "ddim", "--steps", 3, "--seed", 20) == 0
    assert torch.equal(pixels(tmp_path / "frames" / "00000.png"), pixels(tmp_path / "ends" / "00000.png"))
    assert (pixels(tmp_path / "frames" / "00003.png").int() - pixels(tmp_path / "ends" / "00001.png").int()
            ).abs().max() <= 1


def text_only_eps(unet):
    """An eps model that ignores x and t: each channel's prediction is the mean of the text's real tokens' first 4
    features (no context: the null token, as `unet` would use); it takes no image embedding."""

    def forward(x, t, context=None, context_mask=None, image_embed=None):
        if context is None:
            context, context_mask = unet.null_context.expand(len(x), 1, -1), None
        return mean_token(context, context_mask)[:, :4, None, None].expand_as(x)

    return forward


def test_conditional_prompt_guidance_and_negative_prompt(tmp_path):
    path = write_checkpoint(tmp_path, context_dim=384, embed_vqgan=True, prediction_type="epsilon")
    pipeline = load_diffusion_model(path, "cpu")
    options = dict(sampler="ddim", steps=3, progress=False, guidance_interval=None)  # guide at every step
    plain = pipeline.sample_latents(2, seed=0, prompt="a Baroque painting", guidance_scale=1.0, **options)
    guided = pipeline.sample_latents(2, seed=0, prompt="a Baroque painting", guidance_scale=4.0, **options)
    other = pipeline.sample_latents(2, seed=0, prompt="a Cubist still life", guidance_scale=1.0, **options)
    negative = pipeline.sample_latents(2, seed=0, prompt="a Baroque painting", negative_prompt="dark",
                                       guidance_scale=4.0, **options)
    unconditional = pipeline.sample_latents(2, seed=0, **options)
    for a, b in [(plain, guided), (plain, other), (guided, negative), (plain, unconditional)]:
        assert (a - b).abs().max() > 1e-4
    # guidance 1 is the conditional prediction alone, with the null embedding's branch never run
    assert torch.equal(plain, pipeline.sample_latents(2, seed=0, prompt="a Baroque painting", guidance_scale=1.0,
                                                      **options))
    # the direction: with a model whose eps depends on the text alone, a deterministic sample is affine in that eps,
    # so guiding at scale s lands at uncond + s (cond - uncond), and a negative prompt takes the uncond branch's place
    pipeline.unet_forward = text_only_eps(pipeline.unet)
    cond, null, dark = (pipeline.sample_latents(2, seed=0, prompt=prompt, guidance_scale=1.0, **options)
                        for prompt in ("a Baroque painting", None, "dark"))
    size = null.abs().max()
    assert (cond - null).abs().max() > 0.01 * size and (dark - null).abs().max() > 0.01 * size
    guided = pipeline.sample_latents(2, seed=0, prompt="a Baroque painting", guidance_scale=4.0, **options)
    assert (guided - (null + 4.0 * (cond - null))).abs().max() < 1e-5 * size  # float32 rounding
    negative = pipeline.sample_latents(2, seed=0, prompt="a Baroque painting", negative_prompt="dark",
                                       guidance_scale=4.0, **options)
    assert (negative - (dark + 4.0 * (cond - dark))).abs().max() < 1e-5 * size
    pipeline.unet_forward = pipeline.unet
    assert run(path, tmp_path / "out", "--prompt", "a Baroque painting", "--negative_prompt", "dark",
               "--guidance_scale", 3, "--guidance_interval", 0.5, 5, "--guidance_high", 5, 2.5, "--num_images", 1) == 0
    text = png_text(tmp_path / "out" / "00000.png")[0]
    params = json.loads(text["parameters"])
    assert params["steps"] == DEFAULT_STEPS["dpmpp-2m"] == 20  # guided sampling's default
    assert params["prompt"] == "a Baroque painting" and params["negative_prompt"] == "dark"
    assert params["guidance_scale"] == 3.0 and params["guidance_interval"] == [0.5, 5.0]
    assert params["guidance_high"] == [5.0, 2.5]
    assert "--guidance_interval 0.5 5.0 --guidance_high 5.0 2.5" in text["command"]
    # several prompts: one grid row each over the same seeds, each image naming its own prompt
    assert run(path, tmp_path / "rows", "--prompt", "a Baroque painting", "a Cubist still life", "--num_images", 3,
               "--batch_size", 2, "--steps", 2, "--guidance_scale", 3) == 0
    grid_text, grid_size = png_text(tmp_path / "rows" / "grid-00000.png")
    assert grid_size[0] == 3 * grid_size[1] // 2 and json.loads(grid_text["parameters"])["prompt"] == [
        "a Baroque painting", "a Cubist still life"]
    assert json.loads(png_text(tmp_path / "rows" / "00004.png")[0]["parameters"]) == {
        **json.loads(png_text(tmp_path / "out" / "00000.png")[0]["parameters"]), "prompt": "a Cubist still life",
        "negative_prompt": None, "seed": 1, "steps": 2, "checkpoint": str(path),
        "guidance_interval": [0.28, float("inf")], "guidance_high": None}
    assert not torch.equal(pixels(tmp_path / "rows" / "00000.png"), pixels(tmp_path / "rows" / "00003.png"))


@pytest.mark.parametrize("flags,message", [
    (("--steps", 0), "--steps"),
    (("--init_image", "INIT", "--strength", 0), "strength"),
    (("--init_image", "INIT", "--strength", 1.5), "strength"),
    (("--strength", 0.5), "--init_image"),
    (("--init_image", "BAD"), "cannot read init image"),
    (("--init_image", "MISSING"), "cannot read init image"),
    (("--interpolate", "--num_images", 1), "interpolate"),
    (("--prompt", "a painting"), "unconditional"),
    (("--steps", 1001), "steps"),
    (("--sampler", "ddpm", "--eta", 0.5), "eta"),
    (("--num_images", 0), "num_images"),
    (("--guidance_scale", -1), "argument --guidance_scale: must be at least 0"),
    (("--guidance_interval", 2, 1), "--guidance_interval"),
    (("--guidance_high", 5, -1), "argument --guidance_high: must be at least 0"),
    (("--eta", -0.5), "argument --eta: must be at least 0"),
])
def test_bad_input_is_one_clear_error(tmp_path, checkpoint, flags, message):
    from conftest import make_painting

    make_painting(0).save(tmp_path / "init.png")
    (tmp_path / "bad.png").write_text("not an image")
    names = {"INIT": tmp_path / "init.png", "BAD": tmp_path / "bad.png", "MISSING": tmp_path / "missing.png"}
    with pytest.raises(UserError, match=message):
        run(checkpoint, tmp_path / "out", *[names.get(f, f) for f in flags])
    assert not (tmp_path / "out").exists()


def test_missing_or_mismatched_checkpoint(tmp_path, checkpoint):
    with pytest.raises(UserError, match="not found"):
        load_diffusion_model(tmp_path / "nothing", "cpu")
    with pytest.raises(UserError, match="not a Noise2Art diffusion checkpoint"):
        load_diffusion_model(checkpoint.parent / "vqgan", "cpu")
    write_checkpoint(tmp_path)
    config = json.loads((tmp_path / "unet.json").read_text())
    config["unet"]["model_channels"] = 64
    (tmp_path / "unet.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match"):
        load_diffusion_model(tmp_path / "unet", "cpu")
    write_checkpoint(tmp_path / "b")
    (tmp_path / "b" / "vqgan.safetensors").unlink()
    with pytest.raises(UserError, match="VQGAN weights not found"):
        load_diffusion_model(tmp_path / "b" / "unet", "cpu")


def test_bundled_models_sample_without_arguments_and_with_a_prompt(tmp_path, monkeypatch):
    """The Quickstart: no --unet_ckpt_path uses models/unet-uncond, --prompt models/unet-cond (2 images, 2 steps
    here); without a bundled model the same call is a one-line error naming the path."""
    assert run_default(tmp_path / "uncond", "--num_images", 2, "--steps", 2) == 0
    text, size = png_text(tmp_path / "uncond" / "00001.png")
    assert size == (128, 128)
    assert json.loads(text["parameters"])["checkpoint"] == "models/unet-uncond.json (bundled)"
    assert shlex.split(text["command"])[:4] == ["python", "diffusion.py", "--seed", "1"]  # portable: no local path
    assert run_default(tmp_path / "cond", "--num_images", 1, "--steps", 2, "--prompt", "a Baroque painting") == 0
    assert json.loads(png_text(tmp_path / "cond" / "00000.png")[0]["parameters"])["checkpoint"] == (
        "models/unet-cond.json (bundled)")
    monkeypatch.setattr(diffusion, "BUNDLED_MODELS", tmp_path / "nowhere")
    with pytest.raises(UserError, match="no bundled model at .*unet-uncond.json yet.*--unet_ckpt_path"):
        run_default(tmp_path / "none")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("name", ["unet-uncond", "unet-cond"])
def test_bundled_models_denoise_paintings_and_sample_latents_of_their_spread(name):
    """What degenerate weights (zeros, a fresh initialisation) fail: on the latents of 4 paintings noised to t = 100
    and 300 (SNR 4.6 and 0.7 on the bundled schedule) the model's x0 error is under half that of the best denoiser
    that knows only the latents' per-channel mean and variance (their Gaussian posterior mean; the bundled models
    reach about 0.14 of it), and 10 sampling steps end at latents with the spread of encoded paintings."""
    from conftest import make_painting

    pipeline = load_diffusion_model(diffusion.BUNDLED_MODELS / name, "cpu")
    images = torch.stack([image_to_tensor(make_painting(seed, (128, 128)), 128) for seed in range(4)])
    x0 = pipeline.encode(images)
    mean, var = x0.mean((0, 2, 3), keepdim=True), x0.var((0, 2, 3), keepdim=True)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    denoiser = make_denoiser(lambda x, t: pipeline.unet(x, t), pipeline.schedule, pipeline.prediction_type)
    for t in (100, 300):
        a = pipeline.schedule.alpha_bar(torch.tensor(float(t))).item()
        x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
        with torch.no_grad():
            model_error = (denoiser(x_t, torch.full((4,), float(t))) - x0).pow(2).mean().item()
        gaussian = mean + a**0.5 * var * (x_t - a**0.5 * mean) / (a * var + 1 - a)
        assert model_error < 0.5 * (gaussian - x0).pow(2).mean().item(), t
    samples = pipeline.sample_latents(2, seed=0, steps=10, progress=False)
    assert samples.std().item() == pytest.approx(x0.std().item(), rel=0.25)


def run_default(outdir, *flags):
    return diffusion.main(["--outdir", str(outdir), "--device", "cpu", *map(str, flags)])
