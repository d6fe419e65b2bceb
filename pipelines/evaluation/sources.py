"""Latent sources for evaluation besides the held-out images (pipelines/common/holdout.py): latent files
dumped by diffusion models, and a local diffusers pipeline.

Every source ends as scaled latents (N, C, h, w) float32 (the diffusion convention: VAE latents × the VAE's
scaling factor), checked here so that a file in the wrong convention fails with a message instead of giving a
plausible-looking but meaningless FID.
"""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.common.latent_shards import is_latent_shard, read_latents
from pipelines.common.shard_integrity import read_verified, shard_records

LATENT_FILE_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".parquet")
# Keys under which DiT/SiT/MDT/MaskDiT/FiT sampling scripts (and our own tools) store their samples.
ARRAY_KEYS = ("latents", "latent", "samples", "sample", "z", "arr_0")
# Scaled latents have roughly unit variance; raw VAE latents (not × 0.18215) have a std near 5.
SCALED_STD_RANGE = (0.25, 3.0)


def load_latent_file(path: str, channels: int, max_items: int | None = None) -> np.ndarray:
    """Scaled latents (N, C, h, w) float32 from .npy / .npz / .pt / .parquet, validated."""
    suffix = Path(path.split("?")[0]).suffix.lower()
    if suffix not in LATENT_FILE_SUFFIXES:
        raise ValueError(
            f"latent file {path}: unsupported type {suffix!r} (use one of {LATENT_FILE_SUFFIXES})"
        )
    try:
        array = _read_array(path, suffix)
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"latent file {path}: cannot read latents: {error}") from None
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"latent file {path}: expected (N, C, h, w), got shape {array.shape}")
    if array.shape[1] != channels and array.shape[-1] == channels:
        raise ValueError(
            f"latent file {path}: shape {array.shape} looks channels-last; store (N, {channels}, h, w)"
        )
    if array.shape[1] != channels:
        raise ValueError(f"latent file {path}: {array.shape[1]} channels, the VAE has {channels}")
    if not np.isfinite(array).all():
        raise ValueError(f"latent file {path}: contains NaN or Inf")
    std = float(array.std())
    low, high = SCALED_STD_RANGE
    if not low <= std <= high:
        hint = (
            "unscaled VAE latents? multiply by the VAE's scaling factor (0.18215 for SD-VAE)"
            if std > high
            else "latents divided by the scaling factor twice, or not latents at all?"
        )
        raise ValueError(
            f"latent file {path}: std {std:.3f} is outside {SCALED_STD_RANGE} expected of scaled latents "
            f"({hint})"
        )
    return array[:max_items] if max_items else array


def _read_array(path: str, suffix: str) -> np.ndarray:
    if suffix == ".parquet":
        # One of our latent shards is checked against its stage's record, when a manifest beside it has one.
        table = pq.read_table(pa.BufferReader(read_verified(path, shard_records(path.rsplit("/", 1)[0]))))
        if is_latent_shard(table.schema):
            return read_latents(table)  # our own latent shards
        raise ValueError("Parquet latents need our latent-shard layout (a 'latent' column + 'latent_shape')")
    with fsspec.open(path, "rb") as handle:
        if suffix == ".npy":
            return np.load(handle, allow_pickle=False)
        if suffix == ".npz":
            archive = np.load(handle, allow_pickle=False)
            return _pick(dict(archive), path)
        import torch

        loaded = torch.load(handle, map_location="cpu", weights_only=True)  # never unpickle arbitrary code
        if isinstance(loaded, dict):
            loaded = _pick(loaded, path)
        return loaded.float().numpy() if hasattr(loaded, "numpy") else np.asarray(loaded)


def _pick(mapping: dict, path: str):
    for key in ARRAY_KEYS:
        if key in mapping:
            return mapping[key]
    if len(mapping) == 1:
        return next(iter(mapping.values()))
    raise KeyError(f"none of the keys {ARRAY_KEYS} in {sorted(mapping)} ({path})")


def diffusers_latents(pipeline_dir: str, count: int, seed: int, device: str = "cpu", batch_size: int = 64,
                      progress=None, **call_arguments):  # fmt: skip
    """Scaled latents sampled from a local diffusers pipeline (e.g. DiTPipeline), never downloading.

    Sampled `batch_size` at a time on `device` (one pipeline call for 10K samples runs out of memory), with a
    progress line per batch. The class labels are drawn for all samples first and one generator runs on
    through the batches, so the samples depend on (seed, batch size), never on the machine's timing.

    Called with `output_type="latent"`. Pipelines that honour it (Stable Diffusion and its kin) return their
    latents before the decode, already in the scaled convention. DiTPipeline ignores it and decodes anyway:
    then the VAE's decode input is captured, which DiT computed as `latents / scaling_factor`, and that is
    undone exactly.
    """
    import time

    import torch
    from diffusers import DiffusionPipeline

    if not Path(pipeline_dir).is_dir():
        raise ValueError(f"diffusers pipeline {pipeline_dir}: not a local directory (nothing is downloaded)")
    if batch_size < 1:
        raise ValueError(f"diffusers pipeline {pipeline_dir}: batch size must be ≥ 1, got {batch_size}")
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True).to(device)
    vae = getattr(pipeline, "vae", None)
    if vae is None:
        raise ValueError(f"diffusers pipeline {pipeline_dir}: has no `vae` component, so no latents to take")
    scaling = float(vae.config.scaling_factor)
    channels = int(vae.config.latent_channels)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    labels = call_arguments.pop("class_labels", None)
    if labels is None and "prompt" not in call_arguments:
        labels = torch.randint(0, 1000, (count,), generator=generator).tolist()
    batches, started = [], time.perf_counter()
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        arguments = dict(call_arguments)
        if labels is not None:
            arguments["class_labels"] = labels[start : start + size]
        batch = _sample_batch(pipeline, vae, scaling, generator, arguments)
        if batch.ndim != 4 or batch.shape[1] != channels:
            raise ValueError(
                f"diffusers pipeline {pipeline_dir}: expected latents shaped (N, {channels}, h, w), "
                f"got {tuple(batch.shape)}"
            )
        batches.append(batch[:size])
        if progress is not None:
            progress(f"evaluate: sampled {start + size}/{count} latents from {pipeline_dir} on {device} "
                     f"({time.perf_counter() - started:.0f}s)")  # fmt: skip
    return torch.cat(batches).numpy()


def _sample_batch(pipeline, vae, scaling: float, generator, arguments: dict):
    """One pipeline call's latents (on the host, float32, scaled)."""
    import torch

    captured: list[torch.Tensor] = []
    original_decode = vae.decode

    def capturing_decode(latents, *args, **kwargs):
        captured.append((latents.float() * scaling).cpu())
        return original_decode(latents, *args, **kwargs)

    vae.decode = capturing_decode
    try:
        output = pipeline(generator=generator, output_type="latent", **arguments)
    finally:
        vae.decode = original_decode
    if captured:
        return torch.cat(captured)
    return torch.as_tensor(output.images if hasattr(output, "images") else output[0]).float().cpu()
