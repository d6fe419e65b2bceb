"""The two decoders under comparison, as pure batch functions: scaled latents → uint8 images at a size.

The baseline is what a diffusion user has today: the stock VAE decoder at the latent's own size, then a
Pillow Lanczos (or bicubic) resize to the target. InfGen decodes straight to the target in one pass. Both
end as 8-bit images, because that is what gets saved, viewed and scored.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import infgen
from infgen.images import to_uint8

BASELINE, INFGEN = "vae+resize", "infgen"
DECODERS = (BASELINE, INFGEN)
LABELS = {BASELINE: "stock + resize", INFGEN: "InfGen"}  # what grids and the table call them
RESAMPLE = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}


def decode_baseline(vae, latents: torch.Tensor, size: tuple[int, int], resample: str) -> list[np.ndarray]:
    height, width = size
    decoded = vae.decode(latents)
    return [np.asarray(Image.fromarray(to_uint8(image)).resize((width, height), RESAMPLE[resample]))
            for image in decoded]  # fmt: skip


def decode_infgen(model, latents: torch.Tensor, size: tuple[int, int]) -> list[np.ndarray]:
    with torch.inference_mode():
        decoded = infgen.decode(model, latents, size)
    return [to_uint8(image) for image in decoded]


def decode_all(model, vae, latents: torch.Tensor, size, resample: str, batch: int) -> dict[str, list]:
    """{decoder name: [H×W×3 uint8 per latent]}, decoding `batch` latents at a time."""
    outputs: dict[str, list] = {name: [] for name in DECODERS}
    for start in range(0, len(latents), batch):
        part = latents[start : start + batch]
        outputs[BASELINE] += decode_baseline(vae, part, size, resample)
        outputs[INFGEN] += decode_infgen(model, part, size)
    return outputs
