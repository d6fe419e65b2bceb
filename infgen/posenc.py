"""INPE: implicit neural positional embedding for grids of any size.

The paper (arXiv 2509.10441, its §3.2; docs/paper.md, "INPE") gives the pipeline: normalise coordinates per
axis → project onto the unit sphere → random Fourier features → MLP. The constants are not published; the
defaults here are ours (docs/paper.md, "Defaults where the paper is silent") and every one is a config field.

Because the embedding is a function of the *normalised* coordinate only, the latent grid (e.g. 64×64) and the
mask-token grid (e.g. 128×256) land on one shared scale, and a decoder trained at one output size sees
familiar positions at another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class INPEConfig:
    num_frequencies: int = 256  # rows of the Fourier matrix B; the feature vector is twice this long
    frequency_scale: float = 16.0  # σ of B ~ N(0, σ²); large enough to tell neighbouring 4K tokens apart
    frequency_seed: int = 0  # B is a fixed buffer drawn from this seed, so checkpoints need not store it
    longitude_span: float = math.pi  # x̂ ∈ [0, 1] maps to longitudes in [-span/2, span/2]
    latitude_span: float = math.pi / 2  # ŷ ∈ [0, 1] maps to latitudes in [-span/2, span/2]
    cell_centres: bool = (
        True  # (i + 0.5) / n lines up grids of different sizes; False gives the bare i / n form
    )


def normalized_grid(
    rows: int,
    cols: int,
    cell_centres: bool = True,
    row_extent: float | None = None,
    col_extent: float | None = None,
) -> torch.Tensor:
    """(rows·cols, 2) coordinates (x̂, ŷ) of a grid's cells, row-major, float64 for exactness.

    The extents say how many cells span the unit interval. They default to the grid size; the mask-token
    grid of a 1000×333 image passes 125 × 41.625 (its size in pixels / 8), so its last, partly cropped
    column still sits where its pixels do and every output size shares the geometry of the latent grid.
    """
    offset = 0.5 if cell_centres else 0.0
    ys = (torch.arange(rows, dtype=torch.float64) + offset) / (row_extent or rows)
    xs = (torch.arange(cols, dtype=torch.float64) + offset) / (col_extent or cols)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)


def sphere_points(coords: torch.Tensor, longitude_span: float, latitude_span: float) -> torch.Tensor:
    """Map (..., 2) normalised (x̂, ŷ) onto (..., 3) unit vectors of an equirectangular sphere patch.

    A patch of the sphere (not all of it) keeps the map one-to-one: no pole collapse, no left/right wrap.
    """
    longitude = longitude_span * (coords[..., 0] - 0.5)
    latitude = latitude_span * (coords[..., 1] - 0.5)
    return torch.stack(
        [
            torch.cos(latitude) * torch.cos(longitude),
            torch.cos(latitude) * torch.sin(longitude),
            torch.sin(latitude),
        ],
        dim=-1,
    )


class INPE(nn.Module):
    """Normalised coordinates → sphere → Fourier features → MLP → (N, width) embedding."""

    def __init__(self, config: INPEConfig, width: int):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(config.frequency_seed)
        frequencies = torch.randn(config.num_frequencies, 3, generator=generator, dtype=torch.float64)
        # Not a parameter and not saved: rebuilt from the seed, it never drifts or bloats checkpoints.
        self.register_buffer("frequencies", frequencies * config.frequency_scale, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * config.num_frequencies, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, width),
        )

    def fourier_features(self, coords: torch.Tensor) -> torch.Tensor:
        # float64 for the phases: at σ=16 they reach ~50 rad and bf16/fp32 rounding would blur 4K neighbours.
        points = sphere_points(coords.double(), self.config.longitude_span, self.config.latitude_span)
        phases = points @ self.frequencies.double().T  # (N, F)
        return torch.cat([torch.cos(phases), torch.sin(phases)], dim=-1)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """coords: (N, 2) normalised (x̂, ŷ). Returns (N, width) in the MLP's dtype."""
        features = self.fourier_features(coords)
        first = self.mlp[0]
        return self.mlp(features.to(first.weight.dtype))
