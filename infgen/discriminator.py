"""PatchGAN discriminator for the adversarial term of the decoder loss.

The layout follows taming-transformers' `NLayerDiscriminator` (itself from pix2pix):
https://github.com/CompVis/taming-transformers/blob/master/taming/modules/discriminator/model.py
At the defaults (3 layers, 64 base channels) it has about 2.8M parameters and each output logit sees a
70×70 pixel patch, so a 256×256 image gives a 30×30 logit map (docs/paper.md, "Defaults where the paper is
silent").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

KERNEL_SIZE = 4
PADDING = 1
LEAKY_RELU_SLOPE = 0.2
MAX_CHANNEL_MULTIPLIER = 8  # channels double per layer but stop at 8 × base_channels (taming, pix2pix)
INIT_STD = 0.02  # DCGAN/taming init for conv weights and norm scales


@dataclass(frozen=True)
class DiscriminatorConfig:
    input_channels: int = 3  # RGB images in [-1, 1]
    base_channels: int = 64  # taming's `ndf`
    num_layers: int = 3  # taming's `n_layers`: stride-2 convs in total, before the stride-1 block
    norm_groups: int = 32  # GroupNorm groups; must divide every normalized width (2×, 4×, … base_channels)

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"DiscriminatorConfig.num_layers must be >= 1, got {self.num_layers}")
        for width in _normalized_widths(self):
            if width % self.norm_groups:
                raise ValueError(
                    f"DiscriminatorConfig.norm_groups={self.norm_groups} does not divide width {width}"
                )


def _channel_multiplier(layer: int) -> int:
    return min(2**layer, MAX_CHANNEL_MULTIPLIER)


def _normalized_widths(config: DiscriminatorConfig) -> list[int]:
    """Output widths of the normalized blocks: layers 1 … num_layers (the last one is the stride-1 block)."""
    return [config.base_channels * _channel_multiplier(layer) for layer in range(1, config.num_layers + 1)]


def _block(in_channels: int, out_channels: int, stride: int, groups: int) -> list[nn.Module]:
    # GroupNorm, not taming's BatchNorm: per-GPU batches are 1–4 images in stage 2 (2048² targets), far too
    # few for stable batch statistics, and batch statistics (plus running stats) would make D's output for
    # one image depend on the rest of its batch, so an exact resume would depend on batch composition.
    # The norm's affine shift makes a conv bias redundant.
    return [
        nn.Conv2d(in_channels, out_channels, KERNEL_SIZE, stride=stride, padding=PADDING, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True),
    ]


class NLayerDiscriminator(nn.Module):
    """Maps images (B, C, H, W) in [-1, 1] to a map of real/fake logits (B, 1, H', W'), one per patch."""

    def __init__(self, config: DiscriminatorConfig | None = None):
        super().__init__()
        config = config or DiscriminatorConfig()
        self.config = config
        base = config.base_channels
        layers: list[nn.Module] = [
            nn.Conv2d(config.input_channels, base, KERNEL_SIZE, stride=2, padding=PADDING),
            nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True),
        ]
        for layer in range(1, config.num_layers):  # stride-2 blocks, each halves H and W
            in_width, out_width = base * _channel_multiplier(layer - 1), base * _channel_multiplier(layer)
            layers += _block(in_width, out_width, stride=2, groups=config.norm_groups)
        in_width = base * _channel_multiplier(config.num_layers - 1)
        out_width = base * _channel_multiplier(config.num_layers)
        # a stride-1 block widens the receptive field (to 70×70 at 3 layers) without shrinking the map
        layers += _block(in_width, out_width, stride=1, groups=config.norm_groups)
        layers.append(nn.Conv2d(out_width, 1, KERNEL_SIZE, stride=1, padding=PADDING))  # one logit per patch
        self.layers = nn.Sequential(*layers)
        self.init_weights()

    def init_weights(self) -> None:
        """taming's `weights_init`: conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), norm shifts 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, INIT_STD)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, INIT_STD)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)  # (B, C, H, W) → (B, 1, H', W')
