"""The ×8 upsampling pixel decoder that turns the mask-token grid into pixels.

Its shape is the SD-VAE decoder's (conv_in → mid ResBlocks → per level: ResBlocks, nearest ×2 + conv → norm →
conv_out), so it can start as the frozen VAE's own decoder (infgen.warm_start), with three changes, all so
that a tile-by-tile decode equals a one-pass decode and colour survives:

- normalisation is a per-channel affine map (norm="affine"): GroupNorm with its statistics frozen (at warm
  start, the VAE decoder's statistics over calibration latents), not computed per image. GroupNorm's
  per-image statistics span the whole feature map, which is why tiled SD-VAE decodes show tone shifts and
  seams; a per-position LayerNorm (norm="layer", the first design, kept for old checkpoints) tiles exactly
  but divides every position's features by their own norm, which is where the colour lived: it caused the
  colour casts of the first demo (docs/paper.md, "Deviations");
- the mid-block self-attention is dropped: the transformer in front already mixes global context, and an
  attention over 512×512 positions at 4K is the one thing in the decoder that does not tile;
- convolutions pad by repeating the edge (padding="replicate"): zero padding drops taps at the image edge,
  and since features do not average to zero, every output had a 1-pixel coloured border.

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
    norm: str = "affine"  # "affine" (frozen-statistics GroupNorm) or "layer" (per-position LayerNorm, old)
    padding: str = "replicate"  # conv padding: "replicate" or "zeros" (old checkpoints)

    def __post_init__(self):
        if 2 ** (len(self.channels) - 1) != UPSAMPLE_FACTOR:
            raise ValueError(
                f"PixelDecoderConfig.channels needs 4 levels (x{UPSAMPLE_FACTOR}), got {self.channels}"
            )
        if self.norm not in NORMS:
            raise ValueError(f"PixelDecoderConfig.norm={self.norm!r}; choose one of {sorted(NORMS)}")
        if self.padding not in ("replicate", "zeros"):
            raise ValueError(f"PixelDecoderConfig.padding={self.padding!r}; choose 'replicate' or 'zeros'")


class ChannelAffine(nn.Module):
    """y = weight · x + bias per channel: a GroupNorm whose statistics are frozen into its affine parameters.

    Pointwise, so it tiles exactly and keeps each position's magnitude. Identity until warm-started.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


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


NORMS = {"affine": ChannelAffine, "layer": ChannelLayerNorm}


def conv3x3(in_channels: int, out_channels: int, config: PixelDecoderConfig) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, padding_mode=config.padding)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, config: PixelDecoderConfig):
        super().__init__()
        norm = NORMS[config.norm]
        self.norm1 = norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, config)
        self.norm2 = norm(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, config)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    def __init__(self, channels: int, config: PixelDecoderConfig):
        super().__init__()
        self.conv = conv3x3(channels, channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PixelDecoder(nn.Module):
    """(B, in_channels, Hg, Wg) token grid → (B, out_channels, 8·Hg, 8·Wg) image."""

    def __init__(self, config: PixelDecoderConfig):
        super().__init__()
        self.config = config
        deepest = config.channels[-1]
        self.conv_in = conv3x3(config.in_channels, deepest, config)
        self.mid = nn.Sequential(*[ResBlock(deepest, deepest, config) for _ in range(config.mid_blocks)])
        levels = []
        current = deepest
        for index, channels in enumerate(reversed(config.channels)):
            blocks: list[nn.Module] = []
            for _ in range(config.blocks_per_level):
                blocks.append(ResBlock(current, channels, config))
                current = channels
            if index < len(config.channels) - 1:
                blocks.append(Upsample(current, config))
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.Sequential(*levels)
        self.norm_out = NORMS[config.norm](current)
        self.conv_out = conv3x3(current, config.out_channels, config)
        if config.norm == "affine":
            # Without per-image normalisation the residual stream must not grow from the start: each
            # ResBlock's branch starts at zero (a warm start from the VAE's decoder overwrites this).
            for block in self.modules():
                if isinstance(block, ResBlock):
                    nn.init.zeros_(block.conv2.weight)
                    nn.init.zeros_(block.conv2.bias)

    activation_checkpointing = False  # set by InfGen.set_activation_checkpointing (training only)

    def to_channels_last(self) -> PixelDecoder:
        """Convolution weights in channels-last (NHWC) layout, and from then on the inputs too: the same
        values in another memory order, oneDNN's fast path on CPU (`tiny` at 2048²: 25-35 % less CPU time,
        bench/README.md) and cuDNN's native one for bf16 on GPUs. Saves stay contiguous (infgen.save)."""
        if not self.channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    @property
    def channels_last(self) -> bool:
        return self.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        channels_last = self.channels_last
        if channels_last:  # a conv with NHWC weights and NCHW inputs converts on every call
            grid = grid.contiguous(memory_format=torch.channels_last)
        x = self.conv_in(grid)  # (B, C_deep, Hg, Wg)
        x = self.mid(x)
        for level in self.levels:  # → (B, C_full, 8·Hg, 8·Wg)
            # Checkpointed, a level keeps only its input for backward and recomputes the rest: the
            # full-resolution levels' activations are what fills GPU memory at 1024² and beyond.
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(level, x, use_reentrant=False)
            else:
                x = level(x)
        image = self.conv_out(F.silu(self.norm_out(x)))  # (B, 3, 8·Hg, 8·Wg)
        return image.contiguous() if channels_last else image  # callers may .view() the image

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

    def with_halo(
        self, cells: tuple[int, int, int, int], grid_size: tuple[int, int]
    ) -> tuple[int, int, int, int]:
        """Token cells (row0, row1, col0, col1) grown by the receptive radius, clipped to the grid (not
        padded: at the true image border the convs pad as in a one-pass decode)."""
        halo = self.receptive_radius_cells()
        row0, row1, col0, col1 = cells
        return (max(row0 - halo, 0), min(row1 + halo, grid_size[0]),
                max(col0 - halo, 0), min(col1 + halo, grid_size[1]))  # fmt: skip

    def decode_tiled(self, grid: torch.Tensor, out_size: tuple[int, int], tile_cells: int) -> torch.Tensor:
        """Decode tile by tile and write straight into an (B, 3, h, w) canvas; equals forward() then crop.

        Peak memory is that of one (tile_cells + 2·halo)² tile, whatever the output size. The convs' padding
        at the true image border is reproduced because border tiles are clipped to the grid, not padded.
        """
        batch, _, grid_rows, grid_cols = grid.shape
        height, width = out_size
        f = UPSAMPLE_FACTOR
        canvas = grid.new_empty(batch, self.config.out_channels, height, width)
        for row0 in range(0, grid_rows, tile_cells):
            for col0 in range(0, grid_cols, tile_cells):
                row1, col1 = min(row0 + tile_cells, grid_rows), min(col0 + tile_cells, grid_cols)
                ext_row0, ext_row1, ext_col0, ext_col1 = self.with_halo(
                    (row0, row1, col0, col1), (grid_rows, grid_cols)
                )
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
