"""Offline substitute for SD-VAE: a small KL-f8 AutoencoderKL trained once on procedural images, then cached.

Use it only when no real SD-VAE weights are reachable (no network, no local copy). It has the SD-VAE *shape*
(4 latent channels, ×8 downsampling, latents scaled to about unit variance) so every code path downstream
(latent caching, InfGen training, decode, extrapolation) runs unchanged, but its latents are NOT SD latents:
a diffusion model's samples mean nothing to it, and image quality is far below SD-VAE.

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

from infgen.synthetic import make_image
from infgen.vae import FrozenVAE

# Bump when the training code changes in a way the constants below do not capture: it invalidates old caches.
RECIPE_VERSION = 1

# A 4-level SD-style AutoencoderKL: 3 downsamplings → KL-f8, 4 latent channels, 3.9M parameters. SD-VAE has
# the same layout at widths (128, 256, 512, 512) with 2 layers per block (84M); this is what 2 CPU cores can
# train in minutes. Shallower (2-level) configs are slower, not faster: mid-block attention runs at /2 scale.
AUTOENCODER_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 128, 128],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 128,
}

DEFAULT_STEPS = 400  # about 2-3 minutes on 2 idle CPU cores
TRAINING_SEED = 0  # seeds weight init, the data pool and crop positions
POOL_IMAGES = 96  # synthetic images generated up front; crops are drawn from them (generation is not free)
POOL_SIDE_RANGE = (128, 320)  # pool image sides: scenes at several scales, like crops of bigger photos
CROP_SIDE = 64  # training crop side; a conv autoencoder is translation-invariant, so small crops suffice
BATCH_SIZE = 8
LEARNING_RATE = 2e-3  # peak; high because the run is short
WARMUP_STEPS = 20  # linear warm-up, then cosine decay to zero over the remaining steps
WEIGHT_DECAY = 0.0
L1_WEIGHT = 1.0  # L1 keeps edges sharper than MSE alone
MSE_WEIGHT = 0.1  # small MSE term: penalises the rare large errors L1 shrugs off
KL_WEIGHT = 1e-6  # tiny, as in SD-VAE (1e-6): keeps latents near N(0, σ²) without blurring
HOLDOUT_SEED_OFFSET = 1_000_000  # held-out images use seeds ≥ this, never seen in training
HOLDOUT_IMAGES = 8
HOLDOUT_SIDE = 128  # held-out images for the scaling factor and the logged PSNR
LOG_EVERY = 50  # steps between progress lines

CACHE_ENVIRONMENT_VARIABLE = "INFGEN_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/infgen")
FOLDER_PREFIX = "embedded-vae-kl-f8-"
RECIPE_FILE = "recipe.json"  # written next to the weights: the recipe and what training measured

SUBSTITUTE_NOTICE = (
    "OFFLINE SUBSTITUTE VAE: a small KL-f8 AutoencoderKL trained on synthetic images (infgen.synthetic), "
    "NOT SD-VAE. Its latents are not SD latents and its reconstructions are far below SD-VAE quality."
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
    from diffusers import AutoencoderKL  # lazy: `import infgen` must stay fast

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    data_rng = np.random.default_rng(seed)
    pool = _SyntheticPool(data_rng)
    # fork_rng: seed weight init and posterior sampling without disturbing the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = AutoencoderKL(**AUTOENCODER_CONFIG)
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
            loss = loss + KL_WEIGHT * posterior.kl().mean()
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
