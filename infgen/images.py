"""Conversions between model tensors in [-1, 1] and 8-bit images on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) tensor in [-1, 1] → (H, W, 3) uint8, rounding to nearest."""
    scaled = (image.detach().float().clamp(-1, 1) + 1) * 127.5
    return scaled.round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 tensor in [-1, 1]."""
    # torch.tensor copies: arrays read from Arrow buffers or Ray's object store are read-only, which
    # torch.from_numpy warns about.
    return torch.tensor(np.asarray(array)).permute(2, 0, 1).float() / 127.5 - 1


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)
    return path
