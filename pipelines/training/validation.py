"""Validation latents for the training run's MLflow grid: images the latent stage held out (never trained
on), cropped and encoded exactly as the evaluation's reconstruction source does
(pipelines/common/reconstruction.py, with the latent record's VAE and input side). Computed once on the driver
before training and kept beside the run, so a resumed run decodes the same latents."""

from __future__ import annotations

import os

import numpy as np

from pipelines.common.holdout import held_out_images
from pipelines.common.latent_record import LatentRecord
from pipelines.common.reconstruction import encode_crops, read_images
from pipelines.common.vae_source import load_frozen_vae

VALIDATION_IMAGES = 4


def write_validation_latents(images: str, record: LatentRecord, path: str,
                             count: int = VALIDATION_IMAGES) -> str | None:  # fmt: skip
    """Encode up to `count` held-out images into `path` (.npz: latents (N, C, h, w) scaled, keys); return the
    path, or None (saying why) when the latent stage held nothing out."""
    if os.path.isfile(path):
        return path
    try:
        refs = held_out_images(images, record.path, count)
    except ValueError as reason:
        print(f"train: no validation latents ({reason}); the validation grid decodes training latents")
        return None
    side = record.input_side
    vae, label = load_frozen_vae(record.vae, "cpu")
    latents, _ = encode_crops(vae, read_images(refs), (side, side), side)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.partial.npz"
    np.savez(temporary, latents=latents, keys=np.array([ref["key"] for ref in refs]))
    os.replace(temporary, path)  # a file that exists is whole
    print(f"train: validation grid from {len(refs)} held-out image(s), encoded by {label}")
    return path
