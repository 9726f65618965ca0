"""Metrics: pure functions of images and features, for evaluate.py and the trainers. Imports no model or driver.

Images are float tensors B x 3 x H x W in [-1, 1]; features are arrays N x d.
"""
import numpy as np
import torch
import torch.nn.functional as F

from cli import UserError


# ----------------------------------------------------------------------------------------------
# Reconstruction metrics: images -> one value per image


def psnr(images, references):
    """Peak signal-to-noise ratio in dB per image (B-vector), on [0, 1] intensities."""
    mse = ((images.float() - references.float()) / 2).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size=11, sigma=1.5):
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()  # size x size


def ssim(images, references, window_size=11, sigma=1.5):
    """Structural similarity per image (B-vector), Wang et al. 2004: 11x11 Gaussian window
    (sigma 1.5), K1 = 0.01, K2 = 0.03, on [0, 1] intensities, averaged over channels."""
    x = (images.float() + 1) / 2
    y = (references.float() + 1) / 2
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma).to(x.device).expand(channels, 1, window_size, window_size)

    def blur(z):
        return F.conv2d(z, window, groups=channels)  # valid convolution, as in the reference code

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# Set metrics on features N x d


def mean_and_covariance(features):
    """Features N x d -> (mean d, covariance d x d) in float64; unbiased (N - 1) covariance as in the FID code."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise UserError(f"the statistics need at least 2 images, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def drop_rounding_noise(eigenvalues):
    """Eigenvalues of a symmetric PSD matrix with those at rounding-error level (negative ones included) set to 0,
    the tolerance np.linalg.matrix_rank uses: singular covariances (fewer images than dimensions) stay exact."""
    tolerance = eigenvalues.max(initial=0) * len(eigenvalues) * np.finfo(eigenvalues.dtype).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def symmetric_sqrt(matrix):
    """Square root of a symmetric positive semi-definite matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(drop_rounding_noise(eigenvalues))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 C),
    C = (sigma1 sigma2)^1/2. tr C is the sum of the square roots of the eigenvalues of sigma1 sigma2, which are
    those of the symmetric PSD matrix sigma1^1/2 sigma2 sigma1^1/2: symmetric eigendecompositions only, so no
    complex parts and no eps offset (scipy.linalg.sqrtm needs one for singular covariances)."""
    sqrt_sigma1 = symmetric_sqrt(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt_product = np.sqrt(drop_rounding_noise(np.linalg.eigvalsh((product + product.T) / 2))).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)


def polynomial_kernel(x, y):
    """k(x, y) = (x.y / d + 1)^3, the KID kernel (Binkowski et al. 2018): N x d, M x d -> N x M."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x, y):
    """Unbiased estimate of the squared MMD between the distributions of x and y (m x d each, m >= 2)."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    same = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return same - 2 * k_xy.mean()


def kid(features_a, features_b, subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance: mean and std of mmd2_unbiased over `subsets` random subsets of
    m = min(subset_size, N_a, N_b) rows of each set (rows drawn without replacement within a subset).
    Unbiased, so it scatters around 0, negative values included, when both sets come from one distribution."""
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    m = min(subset_size, len(features_a), len(features_b))
    if m < 2:
        raise UserError(f"KID needs at least 2 images in each set, got {len(features_a)} and {len(features_b)}")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(features_a[rng.choice(len(features_a), m, replace=False)],
                            features_b[rng.choice(len(features_b), m, replace=False)]) for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------------------------
# A VQGAN's codebook


def code_statistics(code_counts):
    """Fraction of codes used and perplexity (exp of the entropy of code frequencies)."""
    probs = code_counts / code_counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return (code_counts > 0).float().mean().item(), entropy.exp().item()
