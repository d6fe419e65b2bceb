"""Offline substitute for SD-VAE: a small KL-f8 AutoencoderKL whose weights ship in this repository.

Use it only when no real SD-VAE weights are reachable (no network, no local copy). It has the SD-VAE *shape*
(4 latent channels, ×8 downsampling, latents scaled to about unit variance), so every code path downstream
(latent caching, InfGen training, decode, extrapolation) runs unchanged, but its latents are NOT SD latents:
a diffusion model's samples mean nothing to it, and it is far smaller than SD-VAE (0.4M parameters).

The weights in vae_weights/ were trained once by `python -m infgen.substitutes.train_vae` (the recipe and what
it measured on held-out images are in vae_weights/recipe.json) and load through `FrozenVAE.load`, the same
code path as real weights. Nothing is trained at run time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from infgen.vae import FrozenVAE

WEIGHTS_DIR = Path(__file__).parent / "vae_weights"
RECIPE_FILE = "recipe.json"

SUBSTITUTE_NOTICE = (
    "OFFLINE SUBSTITUTE VAE: a small KL-f8 AutoencoderKL shipped with infgen (trained on synthetic images "
    "and a few bundled photographs), NOT SD-VAE. Its latents are not SD latents."
)


def embedded_vae(log: Callable[[str], None] = print, device: str = "cpu") -> FrozenVAE:
    """The shipped substitute VAE, after saying plainly that it is one."""
    if not (WEIGHTS_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the substitute VAE's weights are missing from {WEIGHTS_DIR}; this installation is incomplete. "
            "Reinstall infgen, or recreate them with `python -m infgen.substitutes.train_vae`"
        )
    log(SUBSTITUTE_NOTICE)
    return FrozenVAE.load(WEIGHTS_DIR, device=device)


def embedded_vae_report() -> dict:
    """The recipe the shipped weights were trained with and what it measured on held-out images."""
    return json.loads((WEIGHTS_DIR / RECIPE_FILE).read_text())
