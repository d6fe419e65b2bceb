"""`infgen decode`: latents file in, PNG(s) of the requested size out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from jobs.options import option


@dataclass(frozen=True, kw_only=True)
class DecodeOptions:
    checkpoint: str = option(help="InfGen checkpoint directory (config.json + weights)")
    latents: str = option(help=".npy of shape (C, h, w) or (B, C, h, w), scaled")
    size: str = option(help="output HEIGHTxWIDTH, e.g. 2160x3840")
    out: str = option(help="output PNG; a batch writes OUT_0.png, OUT_1.png, ...")
    vae: str | None = option(
        None,
        help="frozen VAE (diffusers dir or hub id) for re-encoding beyond the training range (default: the "
        "one the decoder was trained with, as its checkpoint records)",
    )
    device: str = option("cpu", help="torch device")
    dtype: str = option("float32", choices=("float32", "bfloat16"), help="weights and activations")
    query_chunk: int = option(16384, help="mask tokens decoded at once")
    tile_cells: int = option(256, help="pixel-decoder tile side, in 8-px cells (infgen.decode's default)")


def load_latents(path: str | Path):
    """(C, h, w) or (B, C, h, w) float array from a .npy file, as a (B, C, h, w) float32 tensor."""
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latents file {path} does not exist")
    if path.suffix != ".npy":
        raise ValueError(f"latents file {path} is not a .npy file")
    array = np.load(path, allow_pickle=False)  # never unpickle: a .npy from elsewhere is untrusted
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"latents in {path} have shape {array.shape}; expected (C, h, w) or (B, C, h, w)")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"latents in {path} have dtype {array.dtype}; expected a float array")
    return torch.from_numpy(array.astype(np.float32))


def recorded_vae(checkpoint: str) -> tuple[bool, str | None]:
    """(whether the checkpoint records its latents' VAE, that VAE: a path or hub id, None = the embedded
    substitute). Training writes the latent stage's geometry into the decoder's metadata
    (pipelines/training/mlflow_rank0.py, "latents"); a decoder saved otherwise records nothing."""
    from infgen.checkpoint import read_metadata

    geometry = read_metadata(checkpoint).get("latents")
    if not isinstance(geometry, dict) or "vae" not in geometry:
        return False, None
    return True, geometry["vae"]


def extrapolation_vae(args: DecodeOptions, model, latents, size, steps, dtype):
    """The frozen VAE that re-encodes between extrapolation steps: --vae, else the one the checkpoint
    records (the embedded substitute through the loader every stage uses); an error naming both when
    neither is there."""
    from infgen.vae import VAE_DOWNSAMPLE_FACTOR, FrozenVAE

    if args.vae:
        return FrozenVAE.load(args.vae, device=args.device, dtype=dtype)
    recorded, source = recorded_vae(args.checkpoint)
    if not recorded:
        raise ValueError(
            f"size {size[0]}x{size[1]} is beyond this decoder's training range "
            f"({model.config.in_distribution_scale}x the latent's "
            f"{latents.shape[2] * VAE_DOWNSAMPLE_FACTOR}x{latents.shape[3] * VAE_DOWNSAMPLE_FACTOR}) and "
            f"{args.checkpoint} records no VAE it was trained with (no 'latents' geometry in its config.json "
            f"metadata): pass --vae so it can extrapolate in {len(steps)} steps {steps}"
        )
    from pipelines.common.vae_source import load_frozen_vae

    try:
        vae, label = load_frozen_vae(source, args.device)
    except (OSError, ValueError) as error:
        raise ValueError(f"the VAE {source!r} recorded in {args.checkpoint} cannot be loaded ({error}); "
                         "pass --vae") from None  # fmt: skip
    print(f"re-encoding with the VAE the decoder was trained with: {label}")
    return vae


def run_decode(args: DecodeOptions, context=None) -> list[Path]:
    import torch

    import infgen
    from infgen.decode import extrapolation_sizes, parse_size
    from infgen.images import save_png

    size = parse_size(args.size)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = infgen.load(args.checkpoint, device=args.device, dtype=dtype)
    latents = load_latents(args.latents)
    options = {"query_chunk": args.query_chunk, "tile_cells": args.tile_cells}
    steps = extrapolation_sizes(tuple(latents.shape[2:]), size, model.config.in_distribution_scale)
    started = time.perf_counter()
    if len(steps) > 1:
        vae = extrapolation_vae(args, model, latents, size, steps, dtype)
        print(f"extrapolating in {len(steps)} steps: {' -> '.join(f'{h}x{w}' for h, w in steps)}")
        images = infgen.extrapolate(model, vae, latents, size, **options)
    else:
        images = infgen.decode(model, latents, size, **options)
    elapsed = time.perf_counter() - started
    out = Path(args.out)
    paths = (
        [out]
        if len(images) == 1
        else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    )
    for image, path in zip(images, paths):
        save_png(image, path)
        print(f"wrote {path} ({size[0]}x{size[1]})")
    print(f"decoded {len(images)} image(s) in {elapsed:.2f} s on {args.device}")
    return paths
