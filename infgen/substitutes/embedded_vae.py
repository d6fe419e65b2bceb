"""Offline substitute for SD-VAE: a small KL-f8 AutoencoderKL trained once on procedural images, then cached.

Use it only when no real SD-VAE weights are reachable (no network, no local copy). It has the SD-VAE *shape*
(4 latent channels, ×8 downsampling, latents scaled to about unit variance) so every code path downstream
(latent caching, InfGen training, decode, extrapolation) runs unchanged, but its latents are NOT SD latents:
a diffusion model's samples mean nothing to it, and image quality is far below SD-VAE.

It starts as an exact 8×8 average-pool encoder with a nearest-neighbour decoder (see _average_pool_init) and
training smooths and sharpens that. Measured with the defaults (600 steps, ~3 min on one busy CPU core): PSNR
~30 dB on held-out synthetic 128² images and 18.7 dB on skimage's astronaut at 256² (SD-VAE: ~25 dB class);
the result reads as an 8× blurred copy of the input, which is what the 4 × H/8 × W/8 latent can hold here.

The trained weights are written with `save_pretrained` into a folder named after a hash of the recipe, and
then loaded with `FrozenVAE.load`, the same code path as real weights. A recipe change (config, steps, seed,
any constant below) gives a new folder, so a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from infgen._extras import import_extra
from infgen.substitutes.synthetic import make_image
from infgen.vae import FrozenVAE

# Bump when the training code changes in a way the constants below do not capture: it invalidates old caches.
RECIPE_VERSION = 2

# A 4-level SD-style AutoencoderKL: 3 downsamplings → KL-f8, 4 latent channels, 1.0M parameters. SD-VAE has
# the same layout at widths (128, 256, 512, 512) with 2 layers per block (84M). Widths (32, 64, 128, 128)
# (3.9M) reached the same PSNR in the same CPU time with 3× fewer steps, so the narrower one wins: it is also
# 4× cheaper to encode with. Shallower (2-level) configs are slower: mid-block attention runs at /2 scale.
# norm_num_groups is 2 so every GroupNorm at a stream exit sees 8-channel groups (see _average_pool_init).
AUTOENCODER_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 2,
    "sample_size": 128,
}

DEFAULT_STEPS = 600  # about 2-3 minutes on 2 idle CPU cores
TRAINING_SEED = 0  # seeds weight init, the data pool and crop positions
POOL_IMAGES = 96  # synthetic images generated up front; crops are drawn from them (generation is not free)
POOL_SIDE_RANGE = (128, 320)  # pool image sides: scenes at several scales, like crops of bigger photos
CROP_SIDE = 64  # training crop side; a conv autoencoder is translation-invariant, so small crops suffice
BATCH_SIZE = 8
LEARNING_RATE = 3e-4  # peak; 1e-3 knocks the average-pool init off in the first steps and never recovers
WARMUP_STEPS = 50  # linear warm-up, then cosine decay to zero over the remaining steps
WEIGHT_DECAY = 0.0
L1_WEIGHT = 1.0  # L1 keeps edges sharper than MSE alone
MSE_WEIGHT = 0.1  # small MSE term: penalises the rare large errors L1 shrugs off
# SD-VAE's 1e-6, on SD's terms: there the KL (summed over the latent) is weighed against a reconstruction loss
# summed over pixels, so the KL below is divided by the number of pixel values. Against a per-pixel *mean*
# loss an undivided 1e-6 is ~10^4× stronger: it raised the posterior std from 0.007 to 0.2 in 600 steps.
KL_WEIGHT = 1e-6
# The average-pool initialisation (see _average_pool_init).
STREAM_PATTERN = 8  # stream channel c carries +RGB (c % 8 in 0-2), -RGB (3-5) or a reference level (6, 7)
REFERENCE_LEVEL = 8.0  # ±level of the reference channels; dominates GroupNorm statistics at the exits
INITIAL_LOGVAR = -10.0  # posterior std e^-5 ≈ 0.007: near-deterministic latents, as SD-VAE's are
HOLDOUT_SEED_OFFSET = 1_000_000  # held-out images use seeds ≥ this, never seen in training
HOLDOUT_IMAGES = 8
HOLDOUT_SIDE = 128  # held-out images for the scaling factor and the logged PSNR
LOG_EVERY = 50  # steps between progress lines

CACHE_ENVIRONMENT_VARIABLE = "INFGEN_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/infgen")
FOLDER_PREFIX = "embedded-vae-kl-f8-"
RECIPE_FILE = "recipe.json"  # written next to the weights: the recipe and what training measured

SUBSTITUTE_NOTICE = (
    "OFFLINE SUBSTITUTE VAE: a small KL-f8 AutoencoderKL trained on synthetic images "
    "(infgen.substitutes.synthetic), NOT SD-VAE. Its latents are not SD latents and its reconstructions are "
    "far below SD-VAE quality."
)


def embedded_vae(
    cache_dir: str | Path | None = None,
    steps: int = DEFAULT_STEPS,
    log: Callable[[str], None] = print,
    seed: int = TRAINING_SEED,
) -> FrozenVAE:
    """Return the cached substitute VAE, training and caching it first if this recipe has no cache yet.

    `cache_dir` defaults to $INFGEN_CACHE, else ~/.cache/infgen. Training uses the caller's torch thread
    setting; it does not touch the global torch RNG state.
    """
    folder = embedded_vae_directory(cache_dir, steps, seed)
    log(SUBSTITUTE_NOTICE)
    if folder.is_dir():
        log(f"embedded VAE: loading cached weights from {folder}")
        return FrozenVAE.load(folder)

    log(f"embedded VAE: no cache at {folder}; training {steps} steps on synthetic images")
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    autoencoder, final_loss = _train(steps, seed, log)
    holdout = _holdout_images()
    scaling_factor = _calibrate_scaling_factor(autoencoder, holdout, seed)
    autoencoder.register_to_config(scaling_factor=scaling_factor)
    psnr = _reconstruction_psnr(autoencoder, holdout)
    seconds = time.perf_counter() - started
    log(
        f"embedded VAE: trained in {seconds:.1f} s; scaling_factor {scaling_factor:.4f}; "
        f"held-out synthetic {HOLDOUT_SIDE}² PSNR {psnr:.2f} dB"
    )
    report = {"recipe": recipe(steps, seed), "training_seconds": round(seconds, 1), "final_loss": final_loss}
    report.update({"scaling_factor": scaling_factor, "holdout_psnr_db": round(psnr, 2)})
    _save_atomically(autoencoder, folder, report, log)
    return FrozenVAE.load(folder)


def recipe(steps: int = DEFAULT_STEPS, seed: int = TRAINING_SEED) -> dict:
    """Everything that determines the trained weights; its hash names the cache folder."""
    return {
        "version": RECIPE_VERSION,
        "autoencoder": AUTOENCODER_CONFIG,
        "steps": steps,
        "seed": seed,
        "pool_images": POOL_IMAGES,
        "pool_side_range": POOL_SIDE_RANGE,
        "crop_side": CROP_SIDE,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "warmup_steps": WARMUP_STEPS,
        "weight_decay": WEIGHT_DECAY,
        "initialisation": {"pattern": STREAM_PATTERN, "level": REFERENCE_LEVEL, "logvar": INITIAL_LOGVAR},
        "loss_weights": {"l1": L1_WEIGHT, "mse": MSE_WEIGHT, "kl": KL_WEIGHT},
    }


def embedded_vae_directory(
    cache_dir: str | Path | None = None, steps: int = DEFAULT_STEPS, seed: int = TRAINING_SEED
) -> Path:
    """Where this recipe's weights live (whether or not they exist yet)."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENVIRONMENT_VARIABLE) or DEFAULT_CACHE_DIR
    digest = hashlib.sha256(json.dumps(recipe(steps, seed), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{FOLDER_PREFIX}{digest}"


def _train(steps: int, seed: int, log: Callable[[str], None]):
    """Train a fresh AutoencoderKL on random crops of a synthetic image pool; returns (model, final loss)."""
    # Imported here, as in FrozenVAE.load: diffusers is in the pipeline extra only (a clear error without it).
    import_extra("diffusers", "diffusers", "The embedded substitute VAE")
    from diffusers import AutoencoderKL

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    data_rng = np.random.default_rng(seed)
    pool = _SyntheticPool(data_rng)
    # fork_rng: seed weight init and posterior sampling without disturbing the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = AutoencoderKL(**AUTOENCODER_CONFIG)
        _average_pool_init(autoencoder)
        autoencoder.train()
        optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(_learning_rate_factor, total_steps=steps)
        )
        started = time.perf_counter()
        running_loss = 0.0
        for step in range(1, steps + 1):
            images = _crop_batch(pool, data_rng)  # (B, 3, CROP_SIDE, CROP_SIDE) in [-1, 1]
            posterior = autoencoder.encode(images).latent_dist
            reconstruction = autoencoder.decode(posterior.sample()).sample
            error = reconstruction - images
            loss = L1_WEIGHT * error.abs().mean() + MSE_WEIGHT * error.square().mean()
            kl_per_pixel_value = posterior.kl().mean() / images[0].numel()  # kl(): summed per image
            loss = loss + KL_WEIGHT * kl_per_pixel_value
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running_loss += loss.item()
            if step % LOG_EVERY == 0 or step == steps:
                steps_in_window = (step - 1) % LOG_EVERY + 1
                log(
                    f"embedded VAE: step {step}/{steps} loss {running_loss / steps_in_window:.4f} "
                    f"({time.perf_counter() - started:.0f} s)"
                )
                final_loss = running_loss / steps_in_window
                running_loss = 0.0
    return autoencoder.eval(), final_loss


# ---- initialisation: start as an exact 8×8 average-pool encoder and nearest-neighbour decoder ----
#
# From a random init this AutoencoderKL spends its whole CPU budget failing to learn colour: at 500 steps it
# still gave grey 17 dB reconstructions whatever the learning rate, width, or group count. Its main path ends
# in a GroupNorm on both sides, which removes each image's mean and scale, and random convs bury the colour
# under residual-branch noise. So the weights are set by hand to a working codec first (26.6 dB on held-out
# synthetic images before any training, 17.7 dB on a photograph) and training adds detail on top:
#   - residual branches and attention output nothing (zero GroupNorm scale before conv2, zero out-proj),
#     so the main path is conv_in → downsample convs → exit; the zero *scale*, not zero conv2 weights,
#     because Adam's first sign-like step on 576-input zero weights moves every output by ~0.5;
#   - stream channels carry +RGB, -RGB and, only right before each exit GroupNorm, two ±REFERENCE_LEVEL
#     channels. The reference level dominates the group's variance and the ± pairs cancel its mean, so the
#     GroupNorm becomes a near-fixed scaling (±2 % across images) instead of erasing colour;
#   - SiLU(s) - SiLU(-s) = s exactly, so the exit conv reads the ± pair and the path stays linear;
#   - downsample convs average 2×2 (×3 = 8×8 average pool), upsample convs copy (nearest neighbour).


@torch.no_grad()
def _average_pool_init(autoencoder) -> None:
    from diffusers.models.attention_processor import Attention  # its argument is a diffusers model already
    from diffusers.models.resnet import ResnetBlock2D

    config = autoencoder.config
    if config.latent_channels < 3:
        raise ValueError("the average-pool init stores RGB in latent channels 0-2: need latent_channels >= 3")
    for width in config.block_out_channels:
        if (width // config.norm_num_groups) % STREAM_PATTERN:
            raise ValueError(
                f"width {width} / {config.norm_num_groups} groups is not a multiple of {STREAM_PATTERN}: "
                "the exit GroupNorms would split the ± channel pattern"
            )
    for module in autoencoder.modules():
        if isinstance(module, ResnetBlock2D):
            module.norm2.weight.zero_()  # branch = conv2(SiLU(0)) + bias = 0: the block starts as identity
            module.norm2.bias.zero_()
            module.conv2.bias.zero_()
            if module.conv_shortcut is not None:  # width changes copy channels, keeping the pattern
                _copy_channels(module.conv_shortcut)
        if isinstance(module, Attention):
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()

    encoder, decoder = autoencoder.encoder, autoencoder.decoder
    _enter_stream(encoder.conv_in)
    for block in encoder.down_blocks:
        for downsampler in block.downsamplers or []:
            # diffusers pads right/bottom by one, then a 3×3 stride-2 conv: its top-left 2×2 taps = 2×2 mean
            weight = torch.zeros_like(downsampler.conv.weight)  # (C, C, 3, 3)
            for channel in range(weight.shape[0]):
                weight[channel, channel, :2, :2] = 0.25
            downsampler.conv.weight.copy_(weight)
            downsampler.conv.bias.zero_()
    _add_reference_levels(encoder.mid_block.resnets[-1])
    _exit_stream(encoder.conv_norm_out, encoder.conv_out)
    encoder.conv_out.bias[config.latent_channels :] = INITIAL_LOGVAR  # second half of the moments = logvar
    for conv in (autoencoder.quant_conv, autoencoder.post_quant_conv):
        if conv is not None:
            _copy_channels(conv)

    _enter_stream(decoder.conv_in)
    for block in decoder.up_blocks:
        for upsampler in block.upsamplers or []:
            _copy_channels(upsampler.conv)  # after diffusers' nearest ×2 interpolation
    _add_reference_levels(decoder.up_blocks[-1].resnets[-1])
    _exit_stream(decoder.conv_norm_out, decoder.conv_out)


def _enter_stream(conv) -> None:
    """conv_in: stream channel c gets +RGB or -RGB from input channels 0-2 (centre tap), or zero."""
    weight = torch.zeros_like(conv.weight)  # (C, in, k, k)
    centre = conv.weight.shape[-1] // 2
    for channel in range(weight.shape[0]):
        role = channel % STREAM_PATTERN
        if role < 6:
            weight[channel, role % 3, centre, centre] = 1.0 if role < 3 else -1.0
    conv.weight.copy_(weight)
    conv.bias.zero_()


def _add_reference_levels(resnet) -> None:
    """The last block before an exit adds ±REFERENCE_LEVEL on pattern slots 6 and 7 (through conv2's bias)."""
    levels = [0.0] * 6 + [REFERENCE_LEVEL, -REFERENCE_LEVEL]
    bias = torch.tensor([levels[channel % STREAM_PATTERN] for channel in range(resnet.conv2.bias.shape[0])])
    resnet.conv2.bias.copy_(bias)


def _exit_stream(norm, conv) -> None:
    """GroupNorm → SiLU → conv: undo the GroupNorm scale and read RGB off the ± pairs."""
    # Each 8-channel group holds ±R, ±G, ±B and ±level: mean 0, variance (|RGB|² + level²) / 4 ≈ (level/2)².
    scale = [REFERENCE_LEVEL / 2] * 6 + [1.0, 1.0]
    norm.weight.copy_(
        torch.tensor([scale[channel % STREAM_PATTERN] for channel in range(norm.weight.shape[0])])
    )
    norm.bias.zero_()
    weight = torch.zeros_like(conv.weight)  # (out, C, k, k)
    centre = conv.weight.shape[-1] // 2
    for rgb in range(3):
        weight[rgb, rgb, centre, centre] = 1.0  # SiLU(s) - SiLU(-s) = s
        weight[rgb, rgb + 3, centre, centre] = -1.0
    conv.weight.copy_(weight)
    conv.bias.zero_()


def _copy_channels(conv) -> None:
    """Identity-like conv: output channel c copies input channel c mod in_channels at the centre tap."""
    weight = torch.zeros_like(conv.weight)
    centre = conv.weight.shape[-1] // 2
    for channel in range(weight.shape[0]):
        weight[channel, channel % weight.shape[1], centre, centre] = 1.0
    conv.weight.copy_(weight)
    conv.bias.zero_()


def _learning_rate_factor(step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero: a short run needs the decay to settle."""
    warmup = min(WARMUP_STEPS, max(total_steps - 1, 1))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class _SyntheticPool:
    """POOL_IMAGES synthetic images with sides in POOL_SIDE_RANGE, generated on first use and kept.

    Lazy so that a short run (a test with 2 steps) renders only the images it crops from.
    """

    def __init__(self, rng: np.random.Generator):
        self.sides = rng.integers(*POOL_SIDE_RANGE, size=(POOL_IMAGES, 2), endpoint=True)  # (N, [H, W])
        self._images: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.sides)

    def __getitem__(self, index: int) -> torch.Tensor:
        """(3, H, W) float32 in [-1, 1]."""
        if index not in self._images:
            height, width = (int(side) for side in self.sides[index])
            self._images[index] = _to_tensor(make_image(index, height, width))
        return self._images[index]


def _crop_batch(pool: _SyntheticPool, rng: np.random.Generator) -> torch.Tensor:
    """BATCH_SIZE random crops with random horizontal flips: (B, 3, CROP_SIDE, CROP_SIDE)."""
    crops = []
    for image_index in rng.integers(len(pool), size=BATCH_SIZE):
        image = pool[int(image_index)]
        top = int(rng.integers(image.shape[1] - CROP_SIDE + 1))
        left = int(rng.integers(image.shape[2] - CROP_SIDE + 1))
        crop = image[:, top : top + CROP_SIDE, left : left + CROP_SIDE]
        crops.append(crop.flip(-1) if rng.uniform() < 0.5 else crop)
    return torch.stack(crops)


def _holdout_images() -> torch.Tensor:
    """HOLDOUT_IMAGES whole synthetic scenes at HOLDOUT_SIDE², from seeds training never uses."""
    seeds = range(HOLDOUT_SEED_OFFSET, HOLDOUT_SEED_OFFSET + HOLDOUT_IMAGES)
    return torch.stack([_to_tensor(make_image(seed, HOLDOUT_SIDE, HOLDOUT_SIDE)) for seed in seeds])


@torch.no_grad()
def _calibrate_scaling_factor(autoencoder, images: torch.Tensor, seed: int) -> float:
    """1 / std of posterior samples on held-out images: the recipe behind SD-VAE's 0.18215."""
    generator = torch.Generator().manual_seed(seed)
    latents = autoencoder.encode(images).latent_dist.sample(generator=generator)
    return float(1.0 / latents.std())


@torch.no_grad()
def _reconstruction_psnr(autoencoder, images: torch.Tensor) -> float:
    """Mean PSNR (dB) of posterior-mean reconstructions; images in [-1, 1], so the data range is 2."""
    reconstruction = autoencoder.decode(autoencoder.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    mse = (reconstruction - images).square().mean(dim=(1, 2, 3))
    return float((10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))).mean())


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def _save_atomically(autoencoder, folder: Path, report: dict, log: Callable[[str], None]) -> None:
    """save_pretrained into a temporary sibling, then rename it: a killed run leaves no half-written cache."""
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        autoencoder.save_pretrained(temporary, safe_serialization=True)
        (temporary / RECIPE_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
        temporary.chmod(0o755)  # mkdtemp makes it private; the finished cache is an ordinary directory
        try:
            temporary.rename(folder)
        except OSError:
            # Another process finished the same recipe first; its copy is as good as ours.
            if not folder.is_dir():
                raise
            log(f"embedded VAE: {folder} appeared while training; keeping the existing copy")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    log(f"embedded VAE: saved to {folder}")
