"""Reproduce the shipped substitute VAE: `python -m infgen.substitutes.train_vae [--output DIR]`.

Trains a small KL-f8 diffusers AutoencoderKL on procedural images (infgen.substitutes.synthetic) and on the
training split of the bundled photographs (infgen.substitutes.photographs; never the held-out split), then
measures it on held-out images and writes `save_pretrained` weights plus `recipe.json` (the recipe and what
was measured) into DIR, by default the folder the library loads (infgen/substitutes/vae_weights). Needs the
`pipeline` and `vae-training` extras. Nothing calls this at run time: the weights are in the repository.

The architecture is chosen so that InfGen's pixel decoder can be warm-started from this decoder, layer for
layer (infgen.warm_start): no mid-block attention (InfGen's pixel decoder drops it to tile exactly), widths
(16, 32, 64, 64) with 2 ResBlocks per level (layers_per_block + 1), which is also the `tiny` preset's pixel
decoder. Cheap on purpose: the demo decodes 512² images with it on 2 CPU cores.

It starts as an exact 8×8 average-pool encoder and nearest-neighbour decoder (_average_pool_init): from a
random start this autoencoder spends a CPU budget failing to learn colour, since its main path ends in a
GroupNorm on both sides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from infgen._extras import import_extra
from infgen.images import from_uint8
from infgen.substitutes import photographs
from infgen.substitutes.synthetic import make_image

AUTOENCODER_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    # 2 groups: every GroupNorm at a stream exit sees whole 8-channel groups (see _average_pool_init).
    "norm_num_groups": 2,
    "sample_size": 128,
    "mid_block_add_attention": False,
}

STEPS = 1500
SEED = 0  # weight init, data pool, crop positions
SYNTHETIC_IMAGES = 160  # procedural scenes generated up front, sides in SYNTHETIC_SIDE_RANGE
SYNTHETIC_SIDE_RANGE = (128, 320)
PHOTO_SCALES = (1.0, 0.5, 0.25)  # each training photograph at these scales: detail as a downscaled crop has
PHOTO_SHARE = 0.5  # share of each batch cut from photographs (the rest from synthetic scenes)
CROP_SIDE = 64  # convolutions are translation-invariant: small crops suffice
BATCH_SIZE = 12
LEARNING_RATE = 3e-4  # peak; 1e-3 knocks the average-pool start off in the first steps
WARMUP_STEPS = 100
L1_WEIGHT = 1.0
MSE_WEIGHT = 0.1  # penalises the rare large errors L1 shrugs off
# SD-VAE's 1e-6 on SD's terms (KL summed over the latent against a loss summed over pixels): per pixel value.
KL_WEIGHT = 1e-6
STREAM_PATTERN = (
    8  # init: stream channel c carries +RGB (c % 8 in 0-2), -RGB (3-5) or a reference level (6, 7)
)
REFERENCE_LEVEL = 8.0
INITIAL_LOGVAR = -10.0  # posterior std e^-5: near-deterministic latents, as SD-VAE's are
HOLDOUT_SEED_OFFSET = 1_000_000  # held-out synthetic scenes use seeds ≥ this
HOLDOUT_SYNTHETIC = 16
HOLDOUT_SIDE = 128  # "real photographs at 128²": each held-out photograph's centre square, resized
LOG_EVERY = 100

DEFAULT_OUTPUT = Path(__file__).parent / "vae_weights"
RECIPE_FILE = "recipe.json"


def recipe() -> dict:
    return {
        "autoencoder": AUTOENCODER_CONFIG,
        "steps": STEPS,
        "seed": SEED,
        "synthetic_images": SYNTHETIC_IMAGES,
        "synthetic_side_range": SYNTHETIC_SIDE_RANGE,
        "training_photographs": [p.name for p in photographs.TRAINING],
        "photo_scales": PHOTO_SCALES,
        "photo_share": PHOTO_SHARE,
        "crop_side": CROP_SIDE,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "warmup_steps": WARMUP_STEPS,
        "loss_weights": {"l1": L1_WEIGHT, "mse": MSE_WEIGHT, "kl": KL_WEIGHT},
        "initialisation": {"pattern": STREAM_PATTERN, "level": REFERENCE_LEVEL, "logvar": INITIAL_LOGVAR},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the weights")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps (the recipe's by default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)
    started = time.perf_counter()
    autoencoder, final_loss = train(arguments.steps)
    synthetic, photos = holdout_synthetic(), holdout_photographs()
    scaling_factor = calibrate_scaling_factor(autoencoder, torch.cat([synthetic, photos]))
    autoencoder.register_to_config(scaling_factor=scaling_factor)
    report = {
        "recipe": {**recipe(), "steps": arguments.steps},
        "training_seconds": round(time.perf_counter() - started, 1),
        "final_loss": final_loss,
        "scaling_factor": scaling_factor,
        "held_out_synthetic_psnr_db": round(reconstruction_psnr(autoencoder, synthetic), 2),
        "held_out_photograph_psnr_db": round(reconstruction_psnr(autoencoder, photos), 2),
        "held_out_photographs": [p.name for p in photographs.HELD_OUT],
        "held_out_side": HOLDOUT_SIDE,
    }
    print(json.dumps(report, indent=2))
    save(autoencoder, arguments.output, report)


def train(steps: int):
    import_extra("diffusers", "diffusers", "Training the substitute VAE")
    from diffusers import AutoencoderKL

    rng = np.random.default_rng(SEED)
    synthetic = [
        from_uint8(
            make_image(index, *(int(s) for s in rng.integers(*SYNTHETIC_SIDE_RANGE, 2, endpoint=True)))
        )
        for index in range(SYNTHETIC_IMAGES)
    ]
    photos = [scaled for p in photographs.TRAINING for scaled in pyramid(photographs.load_photograph(p))]
    print(
        f"substitute VAE: {len(synthetic)} synthetic images, {len(photos)} photograph scales; {steps} steps"
    )
    torch.manual_seed(SEED)
    autoencoder = AutoencoderKL(**AUTOENCODER_CONFIG)
    _average_pool_init(autoencoder)
    autoencoder.train()
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(learning_rate_factor, total_steps=steps))
    started, running, final_loss = time.perf_counter(), 0.0, float("nan")
    photo_count = round(BATCH_SIZE * PHOTO_SHARE)
    for step in range(1, steps + 1):
        images = torch.stack(
            [random_crop(photos, rng) for _ in range(photo_count)]
            + [random_crop(synthetic, rng) for _ in range(BATCH_SIZE - photo_count)]
        )
        posterior = autoencoder.encode(images).latent_dist
        error = autoencoder.decode(posterior.sample()).sample - images
        loss = L1_WEIGHT * error.abs().mean() + MSE_WEIGHT * error.square().mean()
        loss = loss + KL_WEIGHT * posterior.kl().mean() / images[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % LOG_EVERY == 0 or step == steps:
            final_loss = running / ((step - 1) % LOG_EVERY + 1)
            running = 0.0
            seconds = time.perf_counter() - started
            print(f"substitute VAE: step {step}/{steps} loss {final_loss:.4f} ({seconds:.0f} s)", flush=True)
    return autoencoder.eval(), final_loss


def pyramid(image: np.ndarray) -> list[torch.Tensor]:
    """The photograph at PHOTO_SCALES (antialiased), those at least a crop wide."""
    tensor = from_uint8(image)[None]
    scaled = []
    for scale in PHOTO_SCALES:
        height, width = round(image.shape[0] * scale), round(image.shape[1] * scale)
        if min(height, width) >= CROP_SIDE:
            resized = F.interpolate(tensor, size=(height, width), mode="bicubic", antialias=True)
            scaled.append(resized[0].clamp(-1, 1))
    return scaled


def random_crop(pool: list[torch.Tensor], rng: np.random.Generator) -> torch.Tensor:
    image = pool[int(rng.integers(len(pool)))]
    top = int(rng.integers(image.shape[1] - CROP_SIDE + 1))
    left = int(rng.integers(image.shape[2] - CROP_SIDE + 1))
    crop = image[:, top : top + CROP_SIDE, left : left + CROP_SIDE]
    return crop.flip(-1) if rng.uniform() < 0.5 else crop


def learning_rate_factor(step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = min(WARMUP_STEPS, max(total_steps - 1, 1))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def holdout_synthetic() -> torch.Tensor:
    seeds = range(HOLDOUT_SEED_OFFSET, HOLDOUT_SEED_OFFSET + HOLDOUT_SYNTHETIC)
    return torch.stack([from_uint8(make_image(seed, HOLDOUT_SIDE, HOLDOUT_SIDE)) for seed in seeds])


def holdout_photographs(side: int = HOLDOUT_SIDE) -> torch.Tensor:
    """Each held-out photograph's centre square, resized (antialiased bicubic) to side²: (N, 3, side, side)"""
    squares = []
    for photograph in photographs.HELD_OUT:
        image = photographs.load_photograph(photograph)
        short = min(image.shape[:2])
        top, left = (image.shape[0] - short) // 2, (image.shape[1] - short) // 2
        square = from_uint8(image[top : top + short, left : left + short])[None]
        squares.append(
            F.interpolate(square, size=(side, side), mode="bicubic", antialias=True)[0].clamp(-1, 1)
        )
    return torch.stack(squares)


@torch.no_grad()
def calibrate_scaling_factor(autoencoder, images: torch.Tensor) -> float:
    """1 / std of the latents on held-out images: the recipe behind SD-VAE's 0.18215."""
    return float(1.0 / autoencoder.encode(images).latent_dist.mean.std())


@torch.no_grad()
def reconstruction_psnr(autoencoder, images: torch.Tensor) -> float:
    """Mean PSNR (dB) of posterior-mean reconstructions, on uint8-quantised outputs like a saved image."""
    reconstruction = autoencoder.decode(autoencoder.encode(images).latent_dist.mean).sample
    quantised = ((reconstruction.clamp(-1, 1) + 1) * 127.5).round()
    truth = ((images + 1) * 127.5).round()
    mse = (quantised - truth).square().mean(dim=(1, 2, 3))
    return float((10.0 * torch.log10(255.0**2 / mse.clamp_min(1e-12))).mean())


def save(autoencoder, folder: Path, report: dict) -> None:
    """save_pretrained into a temporary sibling, then swap it in: a killed run leaves the old weights."""
    folder = folder.resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        autoencoder.save_pretrained(temporary, safe_serialization=True)
        (temporary / RECIPE_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        temporary.chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)
        temporary.rename(folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    print(f"substitute VAE: saved to {folder}")


# ---- initialisation: start as an exact 8×8 average-pool encoder and nearest-neighbour decoder ----
#   - residual branches and attention output nothing (zero GroupNorm scale before conv2, zero out-proj), so
#     the main path is conv_in → downsample convs → exit; a zero *scale*, not zero conv2 weights, because
#     Adam's first sign-like step on 576-input zero weights moves every output by ~0.5;
#   - stream channels carry +RGB, -RGB and, right before each exit GroupNorm, two ±REFERENCE_LEVEL channels:
#     the level dominates the group's variance and the ± pairs cancel its mean, so that GroupNorm becomes a
#     near-fixed scaling instead of erasing colour;
#   - SiLU(s) - SiLU(-s) = s exactly, so the exit conv reads the ± pair and the path stays linear;
#   - downsample convs average 2×2 (×3 = 8×8 average pool), upsample convs copy (nearest neighbour).


@torch.no_grad()
def _average_pool_init(autoencoder) -> None:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    config = autoencoder.config
    for width in config.block_out_channels:
        if (width // config.norm_num_groups) % STREAM_PATTERN:
            raise ValueError(f"width {width} / {config.norm_num_groups} groups is not a multiple of 8")
    for module in autoencoder.modules():
        if isinstance(module, ResnetBlock2D):
            module.norm2.weight.zero_()
            module.norm2.bias.zero_()
            module.conv2.bias.zero_()
            if module.conv_shortcut is not None:
                _copy_channels(module.conv_shortcut)
        if isinstance(module, Attention):
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
    encoder, decoder = autoencoder.encoder, autoencoder.decoder
    _enter_stream(encoder.conv_in)
    for block in encoder.down_blocks:
        for downsampler in block.downsamplers or []:
            # diffusers pads right/bottom by one, then a 3×3 stride-2 conv: its top-left 2×2 taps = 2×2 mean
            weight = torch.zeros_like(downsampler.conv.weight)
            for channel in range(weight.shape[0]):
                weight[channel, channel, :2, :2] = 0.25
            downsampler.conv.weight.copy_(weight)
            downsampler.conv.bias.zero_()
    _add_reference_levels(encoder.mid_block.resnets[-1])
    _exit_stream(encoder.conv_norm_out, encoder.conv_out)
    encoder.conv_out.bias[config.latent_channels :] = INITIAL_LOGVAR
    for conv in (autoencoder.quant_conv, autoencoder.post_quant_conv):
        if conv is not None:
            _copy_channels(conv)
    _enter_stream(decoder.conv_in)
    for block in decoder.up_blocks:
        for upsampler in block.upsamplers or []:
            _copy_channels(upsampler.conv)
    _add_reference_levels(decoder.up_blocks[-1].resnets[-1])
    _exit_stream(decoder.conv_norm_out, decoder.conv_out)


def _enter_stream(conv) -> None:
    weight = torch.zeros_like(conv.weight)
    centre = conv.weight.shape[-1] // 2
    for channel in range(weight.shape[0]):
        role = channel % STREAM_PATTERN
        if role < 6:
            weight[channel, role % 3, centre, centre] = 1.0 if role < 3 else -1.0
    conv.weight.copy_(weight)
    conv.bias.zero_()


def _add_reference_levels(resnet) -> None:
    levels = [0.0] * 6 + [REFERENCE_LEVEL, -REFERENCE_LEVEL]
    bias = torch.tensor([levels[channel % STREAM_PATTERN] for channel in range(resnet.conv2.bias.shape[0])])
    resnet.conv2.bias.copy_(bias)


def _exit_stream(norm, conv) -> None:
    scale = [REFERENCE_LEVEL / 2] * 6 + [1.0, 1.0]
    norm.weight.copy_(torch.tensor([scale[c % STREAM_PATTERN] for c in range(norm.weight.shape[0])]))
    norm.bias.zero_()
    weight = torch.zeros_like(conv.weight)
    centre = conv.weight.shape[-1] // 2
    for rgb in range(3):
        weight[rgb, rgb, centre, centre] = 1.0
        weight[rgb, rgb + 3, centre, centre] = -1.0
    conv.weight.copy_(weight)
    conv.bias.zero_()


def _copy_channels(conv) -> None:
    weight = torch.zeros_like(conv.weight)
    centre = conv.weight.shape[-1] // 2
    for channel in range(weight.shape[0]):
        weight[channel, channel % weight.shape[1], centre, centre] = 1.0
    conv.weight.copy_(weight)
    conv.bias.zero_()


if __name__ == "__main__":
    main()
