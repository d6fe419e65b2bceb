"""Check, while the image is built, that /models holds the weights the cluster workflow names, by loading each
one with the code that loads it at run time: a wrong or missing file fails the build, not a stage hours in.

    python infra/docker/check_models.py /models

Expected layout (the paths jobs/laion_5m.yaml and the image's environment name):

    /models/sd-vae-ft-ema/                 diffusers AutoencoderKL directory (config.json + weights)
    /models/inception-2015-12-05.pt        clean-fid's Inception TorchScript (FID, sFID, precision/recall)
    /models/alexnet-owt-7be5be79.pth       torchvision's ImageNet AlexNet state dict (the LPIPS trunk)

Exits 1 with one line per problem, each naming the path and what was wrong.
"""

from __future__ import annotations

import sys
from pathlib import Path

VAE_DIRECTORY = "sd-vae-ft-ema"
INCEPTION_FILE = "inception-2015-12-05.pt"
LPIPS_TRUNK_FILE = "alexnet-owt-7be5be79.pth"


def missing(models: Path) -> list[str]:
    """What is absent from `models`, before anything is loaded (loading the VAE alone takes seconds)."""
    problems = []
    if not (models / VAE_DIRECTORY / "config.json").is_file():
        vae = models / VAE_DIRECTORY
        problems.append(f"{vae}: no config.json (expected a diffusers AutoencoderKL directory)")
    for name in (INCEPTION_FILE, LPIPS_TRUNK_FILE):
        if not (models / name).is_file():
            problems.append(f"{models / name}: missing")
    return problems


def load_each(models: Path) -> list[str]:
    """Load every weight with the project's loaders; substitutes or load errors are problems."""
    from infgen.metrics.inception import load_inception
    from infgen.metrics.perceptual import load_lpips
    from infgen.vae import FrozenVAE

    problems = []
    checks = (
        (models / VAE_DIRECTORY, lambda path: FrozenVAE.load(path) and True),
        (models / INCEPTION_FILE, lambda path: not load_inception(path).is_substitute),
        (models / LPIPS_TRUNK_FILE, lambda path: load_lpips(path).trunk_is_pretrained),
    )
    for path, load in checks:
        try:
            if not load(path):
                problems.append(f"{path}: loaded, but as a substitute rather than these weights")
        except Exception as error:  # any loader failure is reported with its path, then the build stops
            problems.append(f"{path}: cannot be loaded ({type(error).__name__}: {error})")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: check_models.py MODELS_DIRECTORY", file=sys.stderr)
        return 2
    models = Path(argv[0])
    problems = missing(models) or load_each(models)
    for problem in problems:
        print(f"check_models: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_models: {models} holds the SD-VAE, Inception and LPIPS trunk weights")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
