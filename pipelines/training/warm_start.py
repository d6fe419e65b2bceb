"""A fresh training run's starting decoder: the preset's InfGen with its pixel decoder copied from the frozen
VAE's decoder (infgen/warm_start.py), so that step 0 decodes at 1× about as the stock decoder does.

Built once on the driver, before the workers start, from the VAE named in the latent record and a few
training latents (for the GroupNorm statistics), and saved in the run's folder; every worker loads it like an
`--init-from` decoder. A resumed run finds it there and does not rebuild it.
"""

from __future__ import annotations

import os

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.common.latent_record import LatentRecord
from pipelines.common.latent_shards import read_latents
from pipelines.common.vae_source import load_frozen_vae

CALIBRATION_LATENTS = 64  # enough for stable per-group statistics; a VAE decode of 64 small latents on CPU
WARM_START_DIR = "warm_start_decoder"


def warm_start_decoder(config, decoder_config, record: LatentRecord, output: str) -> str:
    """Write (or find) OUTPUT/warm_start_decoder and return its path."""
    import infgen
    from infgen.warm_start import warm_start_pixel_decoder

    path = f"{output}/{WARM_START_DIR}"
    if os.path.isfile(f"{path}/config.json"):
        return path
    vae, label = load_frozen_vae(record.vae, "cpu")
    latents = calibration_latents(record.path, CALIBRATION_LATENTS)
    torch.manual_seed(config.seed)  # the weights the workers would draw themselves: only the copy differs
    model = infgen.InfGen(decoder_config)
    try:
        warm_start_pixel_decoder(model, vae, latents)
    except ValueError as error:
        raise ValueError(
            f"{error}. Train with `--warm-start none` to start the pixel decoder from random weights, or "
            "pick a model preset whose pixel decoder has the VAE decoder's shape"
        ) from None
    infgen.save(model, path, {"warm_start": label, "calibration_latents": len(latents)})
    print(
        f"train: pixel decoder warm-started from the decoder of {label} ({len(latents)} calibration latents)"
    )
    return path


def calibration_latents(latents_dir: str, count: int) -> torch.Tensor:
    """The first `count` latents of the shards, in name order: (N, C, h, w) scaled latents."""
    filesystem, root = fsspec.core.url_to_fs(latents_dir)
    arrays, total = [], 0
    for path in sorted(filesystem.glob(f"{root}/*.parquet")):
        with filesystem.open(path, "rb") as handle:
            array = read_latents(pq.read_table(handle))
        arrays.append(array[: count - total])
        total += len(arrays[-1])
        if total >= count:
            break
    if not total:
        raise ValueError(f"no latents in {latents_dir} to calibrate the warm start with")
    return torch.from_numpy(np.concatenate(arrays)).float()
