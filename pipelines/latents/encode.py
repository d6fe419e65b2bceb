"""Encode one ingest shard into one latent shard: pure function `encode_shard`, Ray actor `ShardEncoder`.

A latent shard `NNNNN.parquet` (same name as its images shard) has the format of
pipelines/common/latent_shards.py, one row per sample. `NNNNN_stats.json` is written last and marks the shard
done; its `file` is the shard's record (sha256 and bytes, hashed as it was written), which the manifest lists
and a resume checks (pipelines/common/shard_integrity.py). The images shard is read whole and checked against
the ingest stage's record of it before anything is decoded.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.common.crops import CropSample, crop_pair, plan_crops
from pipelines.common.holdout import is_held_out
from pipelines.common.image_policy import REASONS, UndecodableImage, decode_rgb
from pipelines.common.latent_shards import SAMPLE_COLUMNS, latent_schema
from pipelines.common.shard_integrity import ShardRecords, read_verified, write_parquet
from pipelines.latents.config import LatentConfig

DECODE_THREADS = 2
DECODE_WINDOW = 16  # images decoded ahead of the encoder


def _samples(
    images: pa.Table, config: LatentConfig, skipped: Counter, undecodable: dict[str, str]
) -> Iterator[tuple[str, int, CropSample, np.ndarray]]:
    keys, data = images.column("key").to_pylist(), images.column("image")
    heights, widths = images.column("height").to_pylist(), images.column("width").to_pylist()

    def prepare(index: int):
        if is_held_out(keys[index], config.holdout_fraction, config.seed):
            return index, [], None, "held_out"
        plan = plan_crops(keys[index], heights[index], widths[index], config.samples_per_image, config.seed,
                          config.policy)  # fmt: skip
        if not plan:
            return index, plan, None, "too_small_for_targets"
        try:
            image = decode_rgb(data[index].as_py())
        except UndecodableImage as error:  # ingest verified it: another decoder, or damage since
            return index, plan, None, error.reason
        return index, plan, [crop_pair(image, sample, config.policy.input_side)[0] for sample in plan], ""

    # Pillow decodes and resizes without the GIL: a few threads keep the encoder fed, a window of images
    # at a time (Executor.map would otherwise decode the whole shard ahead of the encoder).
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        for start in range(0, images.num_rows, DECODE_WINDOW):
            window = range(start, min(start + DECODE_WINDOW, images.num_rows))
            for index, plan, inputs, problem in pool.map(prepare, window):
                if problem:
                    skipped[problem] += 1
                    if problem in REASONS:
                        undecodable[keys[index]] = problem
                    continue
                for sample_index, (sample, pixels) in enumerate(zip(plan, inputs)):
                    yield keys[index], sample_index, sample, pixels


def _encode_batch(vae, batch: list) -> np.ndarray:
    # uint8 to the encoder's device, converted there: a quarter of float32's host-to-GPU traffic.
    pixels = torch.from_numpy(np.stack([item[3] for item in batch])).to(vae.device).permute(0, 3, 1, 2)
    images = pixels.float().div(127.5).sub(1.0)
    mean, std = vae.encode_posterior(images)
    # The noise of each sample comes from its own seed: its latent is the same in any batch.
    noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(item[2].seed))
                         for item in batch])  # fmt: skip
    return (mean.cpu() + std.cpu() * noise).numpy()


def encode_shard(images_path: str, output_dir: str, vae, vae_source: str, config: LatentConfig,
                 image_records: ShardRecords | None = None) -> dict:  # fmt: skip
    """`image_records`: the ingest stage's records of the images shards (None: nothing to check against)."""
    started = time.time()
    filesystem, local = fsspec.core.url_to_fs(images_path)
    # Read whole (the image bytes are nearly all of it anyway): the bytes checked are the bytes decoded.
    data = read_verified(local, image_records, filesystem)
    images = pq.read_table(pa.BufferReader(data), columns=["key", "image", "width", "height"])
    del data
    name = local.rsplit("/", 1)[-1]
    skipped: Counter = Counter()
    undecodable: dict[str, str] = {}  # key → reason, for the images that failed to decode (image_policy.py)
    rows: dict[str, list] = {column: [] for column, _ in SAMPLE_COLUMNS}
    latents: list[np.ndarray] = []
    batch: list = []
    # Streamed: at 512² a shard's encoder inputs would take gigabytes if gathered first.
    for item in itertools.chain(_samples(images, config, skipped, undecodable), [None]):
        if item is not None:
            batch.append(item)
        if batch and (item is None or len(batch) == config.batch_size):
            latents.append(_encode_batch(vae, batch))
            for key, sample_index, sample, _ in batch:
                values = (
                    key, sample_index, sample.seed, sample.top, sample.left, sample.height, sample.width,
                    sample.target_height, sample.target_width, vae.scaling_factor, vae.shift_factor,
                )  # fmt: skip
                for (column, _), value in zip(SAMPLE_COLUMNS, values):
                    rows[column].append(value)
            batch = []
    stacked = np.concatenate(latents) if latents else np.zeros((0, vae.latent_channels, 1, 1), np.float32)
    side = config.policy.input_side // vae.downsample_factor
    shape = (vae.latent_channels, side, side)
    schema = latent_schema(shape, vae_source)
    columns = [pa.array(rows[c], type=t) for c, t in SAMPLE_COLUMNS]
    flat = pa.array(stacked.reshape(-1).astype(np.float32))
    columns.append(pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape))))
    table = pa.Table.from_arrays(columns, schema=schema)

    out_fs, out_root = fsspec.core.url_to_fs(output_dir)
    record = write_parquet(table, out_fs, f"{out_root}/{name}", row_group_size=256)
    stats = {"shard": name, "images": images.num_rows, "samples": table.num_rows, "skipped": dict(skipped)}
    stats["file"] = record
    stats["undecodable"] = undecodable
    stats["images_used"] = images.num_rows - sum(skipped.values())
    # Wall-clock span and worker: where a run's time went (actor start-up, an idle tail, a slow node).
    stats.update(started=round(started, 3), finished=round(time.time(), 3), worker=socket.gethostname(),
                 pid=os.getpid())  # fmt: skip
    out_fs.pipe_file(f"{out_root}/{name.removesuffix('.parquet')}_stats.json", json.dumps(stats).encode())
    return stats


class ShardEncoder:
    """Ray Data actor: loads the frozen VAE once, then encodes whole shards (one per call)."""

    def __init__(self, config: LatentConfig, output_dir: str, threads: int = 1,
                 image_records: ShardRecords | None = None):  # fmt: skip
        from pipelines.common.vae_source import load_frozen_vae

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae, self.vae_source = load_frozen_vae(config.vae, device)
        self.config, self.output_dir, self.image_records = config, output_dir, image_records

    def __call__(self, batch: dict) -> dict:
        results = [encode_shard(str(path), self.output_dir, self.vae, self.vae_source, self.config,
                                self.image_records)
                   for path in batch["path"]]  # fmt: skip
        return {"stats": np.array([json.dumps(result) for result in results])}
