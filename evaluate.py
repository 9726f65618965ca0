"""Evaluation metrics for Noise2Art: reconstruction metrics (PSNR, SSIM) and set metrics.

Images are float tensors B x 3 x H x W in [-1, 1].
"""
import torch
import torch.nn.functional as F


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
