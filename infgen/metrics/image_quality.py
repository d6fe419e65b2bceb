"""Full-reference image metrics (PSNR, SSIM) in pure torch, matching scikit-image's numbers.

Evaluation compares decoded images with their originals per image, on whatever device the decoder ran on, so
these take (B, C, H, W) tensors and return one value per image instead of round-tripping through numpy.
Both follow scikit-image's conventions (the tests check agreement within 1e-4) so reported numbers can be
compared with papers and tools that use it. Everything is computed in float64: SSIM subtracts nearly equal
local moments, and float32 loses several digits there.

The default ``data_range`` is 2.0 because our images live in [-1, 1]; pass 1.0 for images in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_batched_float64(prediction: torch.Tensor, target: torch.Tensor, data_range: float):
    """Check a pair of images; return them as float64 (B, C, H, W) and whether the input was unbatched."""
    if prediction.shape != target.shape:
        shapes = f"{tuple(prediction.shape)} vs {tuple(target.shape)}"
        raise ValueError(f"prediction and target must have the same shape, got {shapes}")
    if prediction.dim() not in (3, 4):
        raise ValueError(f"expected images shaped (B, C, H, W) or (C, H, W), got {tuple(prediction.shape)}")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive (max minus min of the pixel scale), got {data_range}")
    unbatched = prediction.dim() == 3
    if unbatched:
        prediction, target = prediction.unsqueeze(0), target.unsqueeze(0)
    return prediction.to(torch.float64), target.to(torch.float64), unbatched


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, one value per image (shape (B,), or 0-d for a (C, H, W) input).

    Matches ``skimage.metrics.peak_signal_noise_ratio``: 10 * log10(data_range**2 / MSE), the MSE taken over
    all channels and pixels of each image. Identical images have zero MSE and give +inf, as in scikit-image.
    """
    prediction, target, unbatched = _as_batched_float64(prediction, target, data_range)
    mean_squared_error = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    values = 10 * torch.log10(data_range**2 / mean_squared_error)
    return values[0] if unbatched else values


def ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = 7,
    gaussian: bool = False,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity, one value per image (shape (B,), or 0-d for a (C, H, W) input).

    With the defaults this matches scikit-image's
    ``structural_similarity(a, b, data_range=..., channel_axis=...)``: a uniform ``window_size`` squared
    window, K1 = 0.01, K2 = 0.03, sample covariance (N / (N - 1)), and the SSIM map averaged over the region
    where the window fits inside the image, then over channels.
    scikit-image filters the whole image with reflect padding and crops the border afterwards; a conv2d
    without padding yields exactly that cropped region, so no padding mode has to be reproduced.

    ``gaussian=True`` matches scikit-image's ``gaussian_weights=True, use_sample_covariance=False`` (the
    setting of Wang et al. 2004): a gaussian window of ``sigma`` truncated at 3.5 sigma, whose size
    2 * int(3.5 * sigma + 0.5) + 1 (11 for sigma = 1.5) replaces ``window_size``, with population covariance.
    """
    prediction, target, unbatched = _as_batched_float64(prediction, target, data_range)
    if gaussian:
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        radius = int(3.5 * sigma + 0.5)  # scipy.ndimage's rounding of truncate * sigma
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=prediction.device)
        taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
        covariance_scale = 1.0
    else:
        # Odd so the window has a centre pixel; at least 3 so the sample covariance N / (N - 1) is defined.
        if window_size < 3 or window_size % 2 == 0:
            raise ValueError(f"window_size must be an odd integer >= 3, got {window_size}")
        taps = torch.ones(window_size, dtype=torch.float64, device=prediction.device)
        covariance_scale = window_size**2 / (window_size**2 - 1)
    taps = taps / taps.sum()
    size = taps.numel()
    height, width = prediction.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"images of {height}x{width} pixels are smaller than the {size}x{size} SSIM window")

    # Filter the five local moments of every channel together, one depthwise group per map. Both windows are
    # outer products of `taps`, so filtering rows then columns is exact and size/2 times cheaper than 2-D.
    products = [prediction * prediction, target * target, prediction * target]
    maps = torch.cat([prediction, target, *products], dim=1)
    row_kernel = taps.view(1, 1, 1, size).expand(maps.shape[1], 1, 1, size)
    filtered = F.conv2d(maps, row_kernel, groups=maps.shape[1])
    filtered = F.conv2d(filtered, row_kernel.transpose(2, 3), groups=maps.shape[1])
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = filtered.chunk(5, dim=1)
    variance_x = covariance_scale * (mean_xx - mean_x * mean_x)
    variance_y = covariance_scale * (mean_yy - mean_y * mean_y)
    covariance = covariance_scale * (mean_xy - mean_x * mean_y)

    c1 = (0.01 * data_range) ** 2  # stabilisers from Wang et al. 2004, scaled to the pixel range
    c2 = (0.03 * data_range) ** 2
    numerator = (2 * mean_x * mean_y + c1) * (2 * covariance + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (variance_x + variance_y + c2)
    values = (numerator / denominator).mean(dim=(1, 2, 3))
    return values[0] if unbatched else values
