"""The held-out split: which ingested images the decoder never trains on, so evaluation can use them.

`is_held_out` is a pure function of (key, fraction, seed): the latent stage skips these images (counted as
`held_out` in its manifest), and training's validation grid and the evaluation read the rule back from the
latent stage's record, so every side agrees without a list of keys travelling between them, and the split
does not depend on shard layout or order.
"""

from __future__ import annotations

import hashlib

import fsspec
import pyarrow.parquet as pq

from pipelines.common.files import resolve_inputs
from pipelines.common.latent_record import read_latent_record
from pipelines.common.shard_integrity import check_shards


def is_held_out(key: str, fraction: float, seed: int) -> bool:
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"holdout:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def holdout_rule(latents: str | None) -> tuple[float, int]:
    """(fraction, seed) of the images the latent stage at `latents` kept out of training; without a latent
    stage (an ingest kept apart for evaluation), every image: (1.0, 0)."""
    if latents is None:
        return 1.0, 0
    record = read_latent_record(latents)
    return record.holdout_fraction, record.seed


def held_out_images(images: str, latents: str | None, max_images: int) -> list[dict]:
    """[{"shard", "row", "key"}] of the held-out images of `images`, in shard order, at most `max_images`."""
    fraction, seed = holdout_rule(latents)
    if fraction <= 0:
        raise ValueError(
            f"the latent stage at {latents} held no images out (holdout_fraction 0): every image was trained "
            "on; rerun it with --holdout-fraction > 0, or evaluate on a separate ingest without --latents"
        )
    chosen: list[dict] = []
    shards = resolve_inputs([images], "images")
    check_shards(images)  # a missing or truncated shard: one line naming it, before anything is read
    for shard in shards:
        with fsspec.open(shard, "rb") as handle:
            keys = pq.read_table(handle, columns=["key"]).column("key").to_pylist()
        for row, key in enumerate(keys):
            if fraction >= 1.0 or is_held_out(key, fraction, seed):
                chosen.append({"shard": shard, "row": row, "key": key})
                if len(chosen) == max_images:
                    return chosen
    if not chosen:
        raise ValueError(f"no held-out images in {images} (fraction {fraction}, seed {seed})")
    return chosen
