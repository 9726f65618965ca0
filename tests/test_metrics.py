"""metrics.py: set metrics checked against closed forms (Fréchet distance) and their statistics (KID is unbiased),
PSNR/SSIM against hand-computed values, codebook statistics, and the module's place below the scripts."""
import ast

import numpy as np
import pytest
import scipy.linalg
import torch

from cli import UserError
from conftest import ROOT, make_painting
from metrics import code_statistics, frechet_distance, kid, mean_and_covariance, mmd2_unbiased, psnr, ssim


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def diagonal_fd(mu1, s1, mu2, s2):
    return ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()


MU1, S1 = np.array([0.0, 1.0, 2.0, -1.0]), np.array([1.0, 4.0, 9.0, 0.5])
MU2, S2 = np.array([1.0, 1.0, 0.0, -1.0]), np.array([4.0, 1.0, 0.25, 0.5])


def test_frechet_distance_of_exact_diagonal_moments_is_the_closed_form():
    fd = frechet_distance(MU1, np.diag(S1), MU2, np.diag(S2))
    assert fd == pytest.approx(diagonal_fd(MU1, S1, MU2, S2), rel=1e-12)  # 5 + 8.25 = 13.25
    assert fd == pytest.approx(13.25, rel=1e-12)


def test_frechet_distance_of_full_covariances_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-9)


def test_frechet_distance_of_sampled_gaussians_is_near_the_closed_form():
    rng = np.random.default_rng(1)
    x = MU1 + np.sqrt(S1) * rng.normal(size=(20000, 4))
    y = MU2 + np.sqrt(S2) * rng.normal(size=(20000, 4))
    fd = frechet_distance(*mean_and_covariance(x), *mean_and_covariance(y))
    assert fd == pytest.approx(13.25, abs=0.25)  # sampling error of the moments of 20k draws: about 0.1


@pytest.mark.parametrize("n, d", [(500, 8), (10, 32)])  # full rank, and singular (fewer images than dimensions)
def test_frechet_distance_of_a_set_with_itself_is_zero(n, d):
    features = np.random.default_rng(2).normal(size=(n, d)) * np.linspace(0.1, 3, d)
    mu, sigma = mean_and_covariance(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-12 * np.trace(sigma)
    shifted = frechet_distance(mu, sigma, mu + 1, sigma)
    assert shifted == pytest.approx(d, rel=1e-6)


def test_statistics_need_two_images():
    with pytest.raises(UserError, match="at least 2"):
        mean_and_covariance(np.zeros((1, 4)))


# ----------------------------------------------------------------------------------------------
# KID


def test_mmd2_unbiased_is_the_u_statistic():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.3

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]
    expected = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / 20
                - 2 * sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25)
    assert mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-12)


def test_kid_is_unbiased_on_one_distribution_and_positive_on_shifted_ones():
    rng = np.random.default_rng(4)
    same = np.array([kid(rng.normal(size=(20, 8)), rng.normal(size=(20, 8)), subsets=1)[0] for _ in range(400)])
    standard_error = same.std() / np.sqrt(len(same))
    assert abs(same.mean()) < 4 * standard_error  # a biased (V-statistic) estimate sits well above 0
    assert (same < 0).mean() > 0.2  # unbiased: negative values are common
    shifted = np.array([kid(rng.normal(size=(20, 8)), rng.normal(size=(20, 8)) + 0.5, subsets=1)[0]
                        for _ in range(100)])
    assert shifted.mean() > same.mean() + 20 * standard_error and (shifted > 0).mean() > 0.9


def test_kid_averages_over_subsets_of_the_capped_size():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(12, 4)) + 1
    mean, std = kid(a, b, subsets=50, subset_size=1000, seed=0)
    assert std > 0  # 12-row subsets of the 30-row set differ
    assert kid(a, b, subsets=50, subset_size=1000, seed=0) == (mean, std)  # seeded
    full = kid(a[:12], b, subsets=3, subset_size=12)
    assert full[0] == pytest.approx(mmd2_unbiased(a[:12], b)) and full[1] < 1e-12  # subsets of the whole set


# ----------------------------------------------------------------------------------------------
# PSNR / SSIM


def test_psnr_of_identical_images_is_capped_and_of_a_constant_offset_exact():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(psnr(x, x), torch.tensor(100.0))
    # +0.1 in [-1, 1] is 0.05 in [0, 1]: PSNR = -20 log10(0.05)
    assert torch.allclose(psnr(x + 0.1, x), torch.tensor(-20 * np.log10(0.05), dtype=torch.float32), atol=1e-3)


def test_ssim_of_identical_images_is_one_and_noise_lowers_both_metrics():
    generator = torch.Generator().manual_seed(0)
    x = torch.from_numpy(np.asarray(make_painting(0, (48, 48)), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    noise = torch.randn(x.shape, generator=generator)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    scores = [(psnr(x + s * noise, x).item(), ssim(x + s * noise, x).item()) for s in (0.02, 0.1, 0.3)]
    assert scores[0][0] > scores[1][0] > scores[2][0] and 1 > scores[0][1] > scores[1][1] > scores[2][1]


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.2, 0.6  # [0, 1] intensities; no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    x, y = torch.full((1, 3, 16, 16), 2 * a - 1), torch.full((1, 3, 16, 16), 2 * b - 1)
    c1 = 0.01**2
    # fp32 blurs leave variances of about 1e-8 (not 0) against C2 = 9e-4: agreement to about 3e-5
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-4)


def test_ssim_matches_a_direct_window_by_window_computation():
    rng = np.random.default_rng(6)
    x = rng.uniform(size=(3, 14, 15))
    y = np.clip(x + rng.normal(scale=0.1, size=x.shape), 0, 1) ** 1.5
    coords = np.arange(11) - 5
    w = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for c in range(3):
        for i in range(14 - 10):
            for j in range(15 - 10):
                px, py = x[c, i:i + 11, j:j + 11], y[c, i:i + 11, j:j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
                cov = (w * px * py).sum() - mx * my
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    to_tensor = lambda a: torch.from_numpy(a * 2 - 1).float()[None]  # noqa: E731
    assert ssim(to_tensor(y), to_tensor(x)).item() == pytest.approx(np.mean(values), abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Codebook statistics, and where the metrics live


def test_code_statistics_of_two_equally_used_codes_of_four():
    usage, perplexity = code_statistics(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    assert usage == 0.5 and perplexity == pytest.approx(2.0)


def project_imports(path):
    """The project modules a script imports anywhere in it (top level or inside functions)."""
    project = {p.stem for p in ROOT.glob("*.py")}
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & project


def test_metrics_and_models_import_no_driver():
    """Metrics live low and models stay unaware of drivers: no vqgan.py -> evaluate.py -> vqgan.py cycle."""
    assert project_imports(ROOT / "metrics.py") == {"cli"}
    for model in ("vqgan.py", "unet.py", "features.py"):
        assert not project_imports(ROOT / model) & {"evaluate", "trainer", "diffusion", "bench"}, model
