"""InfGen: decode one fixed-size diffusion latent into an image of any resolution (arXiv 2509.10441).

A pure torch library: it never imports ray, mlflow, deepspeed or img2dataset (tests/test_imports.py).

    import infgen
    model = infgen.load("runs/demo/decoder")             # checkpoint directory
    images = infgen.decode(model, latents, (2160, 3840))  # (B, 3, 2160, 3840) in [-1, 1]
"""

from infgen.checkpoint import load, save
from infgen.decode import decode, extrapolate
from infgen.model import PRESETS, InfGen, InfGenConfig, preset

__all__ = ["PRESETS", "InfGen", "InfGenConfig", "decode", "extrapolate", "load", "preset", "save"]
