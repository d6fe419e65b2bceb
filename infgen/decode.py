"""Inference: decode a batch of latents to any size, and climb past the training range by re-encoding.

`decode` is one InfGen forward pass with memory bounded by chunking the mask-token queries and tiling the
pixel decoder. `extrapolate` is the paper's training-free resolution extrapolation (docs/paper.md, "Inference
and extrapolation"):

    L_n = Encoder(I_{n-1}),  I_n = InfGen(L_n, s_n · size(I_{n-1})),  s_n ≤ 2

It starts with one in-distribution decode and then doubles (at most) per step, re-encoding the whole
previous image with the frozen VAE encoder each time (the formula's literal reading).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from infgen.model import InfGen
from infgen.pixel_decoder import UPSAMPLE_FACTOR
from infgen.vae import VAE_DOWNSAMPLE_FACTOR

DEFAULT_QUERY_CHUNK = 16384  # mask tokens per chunk: a 1024² output (16,384 tokens) still runs in one piece
# Pixel-decoder tile side in token cells (2048 px); larger grids are tiled. A tile recomputes a halo of the
# decoder's receptive radius on each side (`paper` 18 cells): at 64-cell tiles that was 1.6-2.2× the output's
# work from 1024² to 4096², at 256 it is one pass up to 2048² and 1.15× at 4096², while peak memory stays one
# tile's, so 4096² still needs about as much as 2048² (bench/README.md, "Decode speed levers").
DEFAULT_TILE_CELLS = 256


class LatentEncoder(Protocol):
    """What extrapolate needs from the frozen VAE (infgen.vae.FrozenVAE satisfies it)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


def parse_size(text: str) -> tuple[int, int]:
    """'2160x3840' (height × width) → (2160, 3840)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ValueError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 2160x3840")
    height, width = (int(p) for p in parts)
    return height, width


def validate_request(model: InfGen, latents: torch.Tensor, size: tuple[int, int]) -> tuple[int, int]:
    """Raise ValueError naming what is wrong with a decode request; return the size as two ints."""
    config = model.config
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if latents.ndim != 4:
        raise ValueError(
            f"latents must have shape (batch, channels, height, width), got {tuple(latents.shape)}"
        )
    if latents.shape[1] != config.latent_channels:
        raise ValueError(
            f"latents have {latents.shape[1]} channels but this decoder expects {config.latent_channels} "
            f"(shape {tuple(latents.shape)}; is the channel axis second?)"
        )
    patch = config.latent_patch_size
    if latents.shape[2] % patch or latents.shape[3] % patch or min(latents.shape[2:]) < 1:
        raise ValueError(
            f"latent grid {tuple(latents.shape[2:])} is not a positive multiple of patch {patch}"
        )
    if not latents.is_floating_point():
        raise ValueError(f"latents must be floating point, got {latents.dtype}")
    bad = (~torch.isfinite(latents)).sum().item()
    if bad:
        raise ValueError(f"latents contain {bad} NaN or infinite values")
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    height, width = size
    if int(height) != height or int(width) != width or height <= 0 or width <= 0:
        raise ValueError(f"size must be two positive integers (height, width), got {size!r}")
    if max(height, width) > config.max_output_side:
        raise ValueError(
            f"size {height}x{width} exceeds max_output_side={config.max_output_side} of the decoder's config"
        )
    return int(height), int(width)


@torch.no_grad()
def decode(
    model: InfGen,
    latents: torch.Tensor,
    size: tuple[int, int],
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    tile_cells: int = DEFAULT_TILE_CELLS,
    channels_last: bool = True,
) -> torch.Tensor:
    """Decode scaled latents (B, C, h_l, w_l) to images (B, 3, h, w) in [-1, 1], in one pass of the model.

    Latents use the diffusion convention: VAE latents already multiplied by the VAE's scaling factor.
    Tiling starts only when the token grid is larger than one tile, so small decodes stay one pass.
    channels_last: put the pixel decoder's conv weights in channels-last layout first (once; it stays so:
    the same values, faster convolutions, PixelDecoder.to_channels_last).
    """
    height, width = validate_request(model, latents, size)
    rows, cols = math.ceil(height / UPSAMPLE_FACTOR), math.ceil(width / UPSAMPLE_FACTOR)
    tile = tile_cells if max(rows, cols) > tile_cells else None
    parameter = next(model.parameters())
    latents = latents.to(device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    if channels_last:
        model.pixel_decoder.to_channels_last()
    try:
        images = model(latents, (height, width), query_chunk=query_chunk, tile_cells=tile)
    finally:
        model.train(was_training)
    return images.clamp_(-1.0, 1.0)


def extrapolation_sizes(
    latent_hw: tuple[int, int],
    size: tuple[int, int],
    in_distribution_scale: float,
    downsample_factor: int = VAE_DOWNSAMPLE_FACTOR,
):
    """Output size of every step: one in-distribution decode, then steps of at most ×2 per side.

    A latent's base size is the image its VAE encoded: latent side × that VAE's `downsample_factor` (KL-f8's
    when the VAE is not known), whatever the pixel decoder's own upsampling.
    """
    base_h, base_w = latent_hw[0] * downsample_factor, latent_hw[1] * downsample_factor
    overshoot = max(size[0] / (base_h * in_distribution_scale), size[1] / (base_w * in_distribution_scale))
    steps = max(0, math.ceil(math.log2(overshoot) - 1e-9)) if overshoot > 1 else 0
    return [
        (max(1, round(size[0] / 2 ** (steps - i))), max(1, round(size[1] / 2 ** (steps - i))))
        for i in range(steps + 1)
    ]


@torch.no_grad()
def extrapolate(
    model: InfGen,
    encoder: LatentEncoder,
    latents: torch.Tensor,
    size: tuple[int, int],
    **decode_options,
) -> torch.Tensor:
    """Decode beyond the training range: decode in range, then re-encode and decode at most ×2 per step."""
    height, width = validate_request(model, latents, size)
    downsample_factor = getattr(encoder, "downsample_factor", VAE_DOWNSAMPLE_FACTOR)  # FrozenVAE has one
    sizes = extrapolation_sizes(
        tuple(latents.shape[2:]), (height, width), model.config.in_distribution_scale, downsample_factor
    )
    images = decode(model, latents, sizes[0], **decode_options)
    for step_size in sizes[1:]:
        images = decode(model, encoder.encode(images), step_size, **decode_options)
    return images
