"""Validation latents for the training run's MLflow grid: images the latent stage held out (never trained
on), cropped and encoded exactly as the evaluation's reconstruction source does
(pipelines/common/reconstruction.py, with the latent record's VAE and input side), with their ground truth
at each validation size, so the grid shows what the decoder should have drawn beside what it drew. Computed
once on the driver before training and kept beside the run, so a resumed run decodes the same latents."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from pipelines.common.crops import centred_sample, crop_pair
from pipelines.common.holdout import held_out_images
from pipelines.common.latent_record import LatentRecord
from pipelines.common.reconstruction import encode_crops, read_images
from pipelines.common.vae_source import load_frozen_vae

VALIDATION_IMAGES = 4


def truth_name(size) -> str:
    """The .npz entry holding the ground truth (N, H, W, 3) uint8 at `size` (height, width)."""
    return f"truth_{int(size[0])}x{int(size[1])}"


def square_crop_truths(pictures: list, size: tuple[int, int], input_side: int) -> np.ndarray:
    """(N, H, W, 3) uint8: the centred square crop that was encoded, resized to `size`. The grid decodes the
    square latents at every size, so a wide size asks for that same square scene stretched, as training's
    squashed crops taught; a wider crop of the photograph would not be what the latent holds."""
    truths = []
    for picture in pictures:
        square = centred_sample(picture.height, picture.width, (input_side, input_side))
        sample = dataclasses.replace(square, target_height=size[0], target_width=size[1])
        truths.append(crop_pair(picture, sample, input_side)[1])
    return np.stack(truths)


def write_validation_latents(images: str, record: LatentRecord, path: str, count: int = VALIDATION_IMAGES,
                             sizes=None) -> str | None:  # fmt: skip
    """Encode up to `count` held-out images into `path` (.npz: latents (N, C, h, w) scaled, keys, and the
    ground truth at each of `sizes`, default the record's validation sizes); return the path, or None
    (saying why) when the latent stage held nothing out."""
    if os.path.isfile(path):
        return path
    try:
        refs = held_out_images(images, record.path, count)
    except ValueError as reason:
        print(f"train: no validation latents ({reason}); the validation grid decodes training latents")
        return None
    side = record.input_side
    vae, label = load_frozen_vae(record.vae, "cpu")
    pictures = read_images(refs)
    latents, _ = encode_crops(vae, pictures, (side, side), side)
    truths = {truth_name(size): square_crop_truths(pictures, tuple(size), side)
              for size in (sizes or record.validation_sizes())}  # fmt: skip
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.partial.npz"
    np.savez(temporary, latents=latents, keys=np.array([ref["key"] for ref in refs]), **truths)
    os.replace(temporary, path)  # a file that exists is whole
    print(f"train: validation grid from {len(refs)} held-out image(s), encoded by {label}")
    return path
