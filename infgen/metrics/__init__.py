"""Evaluation metrics: PSNR and SSIM here; the heavier ones in their own modules, imported where used.

    from infgen.metrics import psnr, ssim                      # pure torch
    infgen.metrics.distribution   FID/sFID/KID/precision-recall on feature arrays, patch crops (scipy for FID)
    infgen.metrics.inception      clean-fid's Inception features, read from local weights only (clean-fid)
    infgen.metrics.perceptual     a frozen LPIPS with a locally loaded trunk (lpips)
    infgen.metrics.local_weights  where pretrained weights come from when nothing may be downloaded

The packages in parentheses come with the `pipeline` extra; importing this package needs none of them.
"""

from infgen.metrics.image_quality import psnr, ssim

__all__ = ["psnr", "ssim"]
