"""The ×8 upsampling pixel decoder that turns the mask-token grid into pixels.

Its shape follows the SD-VAE decoder (conv_in → mid ResBlocks → per level: ResBlocks, nearest ×2 + conv →
norm → conv_out), with two deliberate changes, both so that a tile-by-tile decode equals a one-pass decode:

- normalisation is per position (LayerNorm over channels), not GroupNorm: GroupNorm's statistics span the
  whole feature map, which is why tiled SD-VAE decodes show tone shifts and seams between tiles;
- the mid-block self-attention is dropped: the transformer in front already mixes global context, and an
  attention over 512×512 positions at 4K is the one thing in the decoder that does not tile.

What is left is a purely local operator with a finite receptive field, so tiles decoded with a halo at least
that wide and then cropped reproduce the one-pass output exactly: no blending is needed, and no seams exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# One mask token per 8×8 output pixels, as in the paper. The VAE's downsampling (one latent cell per 8×8 input
# pixels, infgen.vae.VAE_DOWNSAMPLE_FACTOR) is also 8 for KL-f8 but a separate fact: each may change alone.
UPSAMPLE_FACTOR = 8


@dataclass(frozen=True)
class PixelDecoderConfig:
    in_channels: int = 16  # channels each mask token hands over
    channels: tuple[int, ...] = (128, 256, 512, 512)  # per level, full resolution first (SD-VAE's order)
    blocks_per_level: int = 3  # ResBlocks per level (SD-VAE's decoder uses layers_per_block + 1 = 3)
    mid_blocks: int = 2
    out_channels: int = 3

    def __post_init__(self):
        if 2 ** (len(self.channels) - 1) != UPSAMPLE_FACTOR:
            raise ValueError(
                f"PixelDecoderConfig.channels needs 4 levels (x{UPSAMPLE_FACTOR}), got {self.channels}"
            )


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each position of a (B, C, H, W) map: statistics never cross pixels."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, eps=1e-6)
        return x.permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = ChannelLayerNorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PixelDecoder(nn.Module):
    """(B, in_channels, Hg, Wg) token grid → (B, out_channels, 8·Hg, 8·Wg) image."""

    def __init__(self, config: PixelDecoderConfig):
        super().__init__()
        self.config = config
        deepest = config.channels[-1]
        self.conv_in = nn.Conv2d(config.in_channels, deepest, 3, padding=1)
        self.mid = nn.Sequential(*[ResBlock(deepest, deepest) for _ in range(config.mid_blocks)])
        levels = []
        current = deepest
        for index, channels in enumerate(reversed(config.channels)):
            blocks: list[nn.Module] = []
            for _ in range(config.blocks_per_level):
                blocks.append(ResBlock(current, channels))
                current = channels
            if index < len(config.channels) - 1:
                blocks.append(Upsample(current))
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.Sequential(*levels)
        self.norm_out = ChannelLayerNorm(current)
        self.conv_out = nn.Conv2d(current, config.out_channels, 3, padding=1)

    activation_checkpointing = False  # set by InfGen.set_activation_checkpointing (training only)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(grid)  # (B, C_deep, Hg, Wg)
        x = self.mid(x)
        for level in self.levels:  # → (B, C_full, 8·Hg, 8·Wg)
            # Checkpointed, a level keeps only its input for backward and recomputes the rest: the
            # full-resolution levels' activations are what fills GPU memory at 1024² and beyond.
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(level, x, use_reentrant=False)
            else:
                x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 3, 8·Hg, 8·Wg)

    def receptive_radius_cells(self) -> int:
        """How many token-grid cells beyond a tile can influence its pixels (rounded up).

        Every 3×3 conv reaches one position further at its own scale; at scale s (pixels per cell ÷ 8 … 1)
        that is 1/s cells. Summed over the network and rounded up, it is the halo a tile needs.
        """
        reach = 0.0
        scale = 1.0  # positions per token cell at the current level
        for module in self.modules():
            if isinstance(module, Upsample):
                scale *= 2  # the Upsample's own conv runs after the ×2, so it is counted at the new scale
            if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                reach += (module.kernel_size[0] // 2) / scale
        return math.ceil(reach)

    def decode_tiled(self, grid: torch.Tensor, out_size: tuple[int, int], tile_cells: int) -> torch.Tensor:
        """Decode tile by tile and write straight into an (B, 3, h, w) canvas; equals forward() then crop.

        Peak memory is that of one (tile_cells + 2·halo)² tile, whatever the output size. Conv zero padding
        at the true image border is reproduced because border tiles are clipped to the grid, not padded.
        """
        batch, _, grid_rows, grid_cols = grid.shape
        height, width = out_size
        halo = self.receptive_radius_cells()
        f = UPSAMPLE_FACTOR
        canvas = grid.new_empty(batch, self.config.out_channels, height, width)
        for row0 in range(0, grid_rows, tile_cells):
            for col0 in range(0, grid_cols, tile_cells):
                row1, col1 = min(row0 + tile_cells, grid_rows), min(col0 + tile_cells, grid_cols)
                ext_row0, ext_col0 = max(row0 - halo, 0), max(col0 - halo, 0)
                ext_row1, ext_col1 = min(row1 + halo, grid_rows), min(col1 + halo, grid_cols)
                tile = self(grid[:, :, ext_row0:ext_row1, ext_col0:ext_col1])
                # pixels of the core tile, clipped to the requested (possibly non-multiple-of-8) size
                top, left = row0 * f, col0 * f
                bottom, right = min(row1 * f, height), min(col1 * f, width)
                if bottom <= top or right <= left:
                    continue
                inner_top, inner_left = top - ext_row0 * f, left - ext_col0 * f
                canvas[:, :, top:bottom, left:right] = tile[
                    :, :, inner_top : inner_top + bottom - top, inner_left : inner_left + right - left
                ]
        return canvas
