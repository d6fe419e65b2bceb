"""Start InfGen's pixel decoder as the frozen VAE's own decoder (the default for a fresh training run).

The pixel decoder has the VAE decoder's layout (infgen/pixel_decoder.py), so every conv is copied as it is.
Three parts need translating:

- conv_in: the VAE decodes post_quant_conv(z / scaling_factor + shift_factor); the pixel decoder reads the
  scaled latent from the first latent_channels token channels (InfGenConfig.token_skip). The 1×1
  post_quant_conv, the scaling and the shift are linear, so they fold into conv_in's weights and bias (exact,
  padding included: a replicate-padded constant stays constant). The other token channels start unread.
- GroupNorm → ChannelAffine: GroupNorm's statistics are measured on calibration latents (each group's mean
  and variance per image, averaged over the images) and frozen into the affine parameters:
  weight = γ / σ_group, bias = β − γ · μ_group / σ_group. Per-image statistics are what tiling cannot have.
- the mid-block attention, where the VAE has one, is dropped (the pixel decoder has none); SD-VAE has one,
  the shipped substitute VAE does not.

With the transformer's token contribution starting at zero (InfGen.initialize_weights), the untrained model
at 1× decodes about as the stock decoder does (measured: tests/test_warm_start.py, bench/README.md).
"""

from __future__ import annotations

import torch
from torch import nn

from infgen.model import InfGen
from infgen.pixel_decoder import ChannelAffine, ResBlock, Upsample


@torch.no_grad()
def warm_start_pixel_decoder(model: InfGen, vae, calibration_latents: torch.Tensor) -> None:
    """Copy `vae`'s decoder into `model.pixel_decoder` in place.

    vae: an infgen.vae.FrozenVAE (its diffusers AutoencoderKL). calibration_latents: (B, C, h, w) latents,
    scaled as the model receives them, for the GroupNorm statistics (a few dozen training latents suffice).
    """
    autoencoder = vae.autoencoder
    _check_compatible(model, autoencoder)
    statistics = _group_norm_statistics(vae, calibration_latents)
    ours, theirs = _paired_modules(model.pixel_decoder, autoencoder.decoder)
    for target, source in zip(ours, theirs):
        if isinstance(source, nn.GroupNorm):
            mean, std = statistics[source]
            scale = source.weight / std
            target.weight.copy_(scale)
            target.bias.copy_(source.bias - scale * mean)
        else:
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)
    _fold_conv_in(model, vae)


def _check_compatible(model: InfGen, autoencoder) -> None:
    config, vae_config = model.config, autoencoder.config
    decoder = config.decoder
    problems = []
    if tuple(decoder.channels) != tuple(vae_config.block_out_channels):
        problems.append(
            f"widths {tuple(decoder.channels)} vs the VAE's {tuple(vae_config.block_out_channels)}"
        )
    if decoder.blocks_per_level != vae_config.layers_per_block + 1:
        problems.append(f"{decoder.blocks_per_level} blocks per level vs {vae_config.layers_per_block + 1}")
    if decoder.mid_blocks != len(autoencoder.decoder.mid_block.resnets):
        problems.append(f"{decoder.mid_blocks} mid blocks vs {len(autoencoder.decoder.mid_block.resnets)}")
    if decoder.norm != "affine":
        problems.append(f"norm {decoder.norm!r} (needs 'affine')")
    if not config.token_skip or config.latent_patch_size != 1:
        problems.append("the latent must reach the tokens directly (token_skip, latent_patch_size 1)")
    if config.latent_channels != vae_config.latent_channels:
        problems.append(f"{config.latent_channels} latent channels vs {vae_config.latent_channels}")
    if decoder.out_channels != vae_config.out_channels:
        problems.append(f"{decoder.out_channels} output channels vs {vae_config.out_channels}")
    if problems:
        raise ValueError(
            "cannot warm-start the pixel decoder from this VAE's decoder: " + "; ".join(problems)
        )


def _paired_modules(pixel_decoder, vae_decoder) -> tuple[list[nn.Module], list[nn.Module]]:
    """Our convs and norms, and the VAE decoder's counterparts, in the same order (conv_in excluded)."""
    ours: list[nn.Module] = []
    theirs: list[nn.Module] = []

    def resnet(target: ResBlock, source) -> None:
        ours.extend([target.norm1, target.conv1, target.norm2, target.conv2])
        theirs.extend([source.norm1, source.conv1, source.norm2, source.conv2])
        if source.conv_shortcut is not None:
            ours.append(target.skip)
            theirs.append(source.conv_shortcut)

    for target, source in zip(pixel_decoder.mid, vae_decoder.mid_block.resnets):
        resnet(target, source)
    for level, block in zip(pixel_decoder.levels, vae_decoder.up_blocks):
        resnets = [module for module in level if isinstance(module, ResBlock)]
        for target, source in zip(resnets, block.resnets):
            resnet(target, source)
        upsamplers = [module for module in level if isinstance(module, Upsample)]
        for target, source in zip(upsamplers, block.upsamplers or []):
            ours.append(target.conv)
            theirs.append(source.conv)
    ours.extend([pixel_decoder.norm_out, pixel_decoder.conv_out])
    theirs.extend([vae_decoder.conv_norm_out, vae_decoder.conv_out])
    for target, source in zip(ours, theirs):
        if isinstance(source, nn.GroupNorm) != isinstance(target, ChannelAffine):
            raise ValueError(f"warm start paired {type(target).__name__} with {type(source).__name__}")
        if target.weight.shape != source.weight.shape:
            raise ValueError(
                f"warm start: shape {tuple(target.weight.shape)} vs {tuple(source.weight.shape)}"
            )
    return ours, theirs


def _group_norm_statistics(vae, latents: torch.Tensor) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std) of each decoder GroupNorm's groups, averaged over the calibration images."""
    collected: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def record(module: nn.GroupNorm, inputs, _output) -> None:
        x = inputs[0].float()
        batch, channels = x.shape[:2]
        grouped = x.reshape(batch, module.num_groups, -1)
        mean, variance = grouped.mean(-1), grouped.var(-1, unbiased=False)  # (B, G)
        collected.setdefault(module, []).append((mean.mean(0), variance.mean(0)))

    norms = [m for m in vae.autoencoder.decoder.modules() if isinstance(m, nn.GroupNorm)]
    handles = [norm.register_forward_hook(record) for norm in norms]
    try:
        vae.decode(latents.to(vae.device, vae.dtype))
    finally:
        for handle in handles:
            handle.remove()
    statistics = {}
    for norm in norms:
        mean, variance = (torch.stack(values).mean(0) for values in zip(*collected[norm]))  # (G,)
        per_group = norm.num_channels // norm.num_groups
        std = (variance + norm.eps).sqrt()
        statistics[norm] = (mean.repeat_interleave(per_group), std.repeat_interleave(per_group))
    return statistics


def _fold_conv_in(model: InfGen, vae) -> None:
    """conv_in(tokens) = VAE conv_in(post_quant_conv(tokens[:C] / scaling_factor + shift_factor))."""
    autoencoder = vae.autoencoder
    conv_in, source = model.pixel_decoder.conv_in, autoencoder.decoder.conv_in
    channels = model.config.latent_channels
    post_quant = autoencoder.post_quant_conv
    if post_quant is not None:
        mix, offset = post_quant.weight[:, :, 0, 0].float(), post_quant.bias.float()  # (C, C), (C,)
    else:
        mix, offset = torch.eye(channels), torch.zeros(channels)
    offset = offset + mix @ torch.full((channels,), vae.shift_factor)
    mix = mix / vae.scaling_factor
    weight = torch.zeros_like(conv_in.weight)
    weight[:, :channels] = torch.einsum("ojkl,jc->ockl", source.weight.float(), mix)
    conv_in.weight.copy_(weight)
    conv_in.bias.copy_(source.bias.float() + torch.einsum("ojkl,j->o", source.weight.float(), offset))
