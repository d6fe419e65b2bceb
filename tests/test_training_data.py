"""Training's data path off the step (pipelines/training/data.py): prefetched and threaded batches are the
batches of the plain path (so a resumed run sees the same ones), each shard is read once an epoch per rank,
and the reduced JPEG decode gives the full decode's ground truth. No Ray: real shards from encode_shard and
the tiny real VAE."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from infgen.substitutes.synthetic import make_image
from pipelines.common.crops import CropPolicy, CropSample, crop_pair
from pipelines.latents.config import LatentConfig
from pipelines.latents.encode import encode_shard
from pipelines.training.data import LatentBatches, ground_truth


def jpeg(seed, width, height):
    buffer = io.BytesIO()
    Image.fromarray(make_image(seed, height, width)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tiny_vae_directory, tmp_path_factory):
    """Three image shards of six 200×160 images and their latent shards (64² crops, targets 64–96)."""
    from pipelines.common.vae_source import load_frozen_vae

    root = tmp_path_factory.mktemp("training_data")
    images, latents = root / "images", root / "latents"
    images.mkdir()
    latents.mkdir()
    config = LatentConfig(policy=CropPolicy(input_side=64, min_side=64, max_side=96, step=32),
                          samples_per_image=4, batch_size=24, holdout_fraction=0,
                          vae=str(tiny_vae_directory))  # fmt: skip
    vae, source = load_frozen_vae(config.vae, "cpu")
    for shard in range(3):
        seeds = range(shard * 6, shard * 6 + 6)
        table = pa.table({"key": [f"{seed:06d}" for seed in seeds],
                          "image": pa.array([jpeg(seed, 200, 160) for seed in seeds], pa.binary()),
                          "width": pa.array([200] * 6, pa.int32()),
                          "height": pa.array([160] * 6, pa.int32())})  # fmt: skip
        pq.write_table(table, images / f"{shard:05d}.parquet")
        encode_shard(str(images / f"{shard:05d}.parquet"), str(latents), vae, source, config)
    return str(latents), str(images)


def test_prefetched_threaded_batches_are_the_plain_ones_and_resume_the_same(shards):
    plain = LatentBatches(*shards, 4, seed=0, cache_shards=2, prefetch=0, decode_threads=1)
    fast = LatentBatches(*shards, 4, seed=0, cache_shards=2, prefetch=3, decode_threads=3)
    resumed = LatentBatches(*shards, 4, seed=0, cache_shards=2)
    try:
        assert plain.per_epoch >= 4
        middle = plain.per_epoch + 2  # in the second epoch, as a resume from a checkpoint there would ask
        for index in range(plain.per_epoch + 4):
            latents, truth = plain.batch(index, rank=1, world_size=2)
            other_latents, other_truth = fast.batch(index, rank=1, world_size=2)
            assert (
                latents.shape[0] == 2
                and torch.equal(latents, other_latents)
                and torch.equal(truth, other_truth)
            )
            if index >= middle:
                again_latents, again_truth = resumed.batch(index, rank=1, world_size=2)
                assert torch.equal(latents, again_latents) and torch.equal(truth, again_truth)
    finally:
        for data in (plain, fast, resumed):
            data.close()


@pytest.mark.parametrize("rank", [0, 1])
def test_each_shard_is_read_once_an_epoch_per_rank(shards, rank):
    # cache_shards=2: a window of one shard, so most buckets carry samples over to later shards' windows.
    # No prefetch, so that the counts stop at the epoch's end (a prefetch would start the next one).
    data = LatentBatches(*shards, 4, seed=0, cache_shards=2, prefetch=0)
    try:
        carried = sum(
            len({ref.shard for ref in refs[rank * 2 : rank * 2 + 2]}) > 1 for refs in data.epoch(0)
        )  # batch slices that mix shards: an LRU of one shard would reread for them
        assert carried > 0
        for index in range(data.per_epoch):
            data.batch(index, rank, world_size=2)
        needed = {ref.shard for refs in data.epoch(0) for ref in refs[rank * 2 : rank * 2 + 2]}
        assert dict(data.shard_reads) == {name: 1 for name in needed}
        for index in range(data.per_epoch, 2 * data.per_epoch):
            data.batch(index, rank, world_size=2)
        assert max(data.shard_reads.values()) == 2 and not data._rows  # nothing kept past its epoch
    finally:
        data.close()


def test_reduced_jpeg_decode_gives_the_full_decodes_ground_truth():
    image = jpeg(7, 1600, 1200)
    sample = CropSample(
        top=100, left=200, height=1000, width=1000, target_height=240, target_width=240, seed=0
    )
    reduced = ground_truth(image, sample).astype(np.float32)
    full = ground_truth(image, sample, reduced=False)
    assert np.array_equal(full, crop_pair(Image.open(io.BytesIO(image)).convert("RGB"), sample, 8)[1])
    assert reduced.shape == full.shape == (240, 240, 3)
    assert np.abs(reduced - full).mean() < 2.0  # of 255: the same picture, resampled another way
    close = CropSample(top=0, left=0, height=300, width=300, target_height=240, target_width=240, seed=0)
    assert np.array_equal(ground_truth(image, close), ground_truth(image, close, reduced=False))  # < 2×: full
