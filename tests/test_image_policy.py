"""The large-image policy (pipelines/common/image_policy.py) in every stage that decodes: a 190 MP image
(above Pillow's default guard, which raised at ~179 MP) passes ingest's verification, the latent stage's
encoder and training's ground truth; an image that fails to decode is skipped with its key, not a crash.
No Ray: the stages' per-shard functions on real Parquet shards and the tiny real VAE."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.common.crops import CropPolicy
from pipelines.common.image_policy import MAX_PIXELS, UndecodableImage, decode_rgb
from pipelines.ingest.config import IngestConfig, VerifyConfig
from pipelines.ingest.verification import verify_image
from pipelines.latents.config import LatentConfig
from pipelines.latents.encode import encode_shard
from pipelines.training.data import LatentBatches

GIANT_SIDE = 13800  # 190.4 MP


@pytest.fixture(scope="module")
def giant_jpeg():
    """A one-colour 190 MP JPEG: ~3 MB, made in ~2 s; decoded it takes 570 MB."""
    buffer = io.BytesIO()
    Image.new("RGB", (GIANT_SIDE, GIANT_SIDE), (90, 120, 30)).save(buffer, format="JPEG", quality=50)
    return buffer.getvalue()


def jpeg(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_the_limit_is_one_setting_that_ingest_cannot_exceed():
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS == VerifyConfig().max_pixels
    assert VerifyConfig(max_pixels=10**8).max_pixels == 10**8  # stricter is allowed
    with pytest.raises(ValueError, match="ingest verify.max_pixels is 200000001: it must be in"):
        VerifyConfig(max_pixels=MAX_PIXELS + 1)
    with pytest.raises(ValueError, match="verify.max_pixels"):
        IngestConfig.from_dict({"verify": {"max_pixels": 300_000_000}})


def test_an_image_over_the_limit_is_refused_from_its_header():
    buffer = io.BytesIO()
    Image.new("1", (15000, 14000)).save(buffer, format="PNG")  # 210 MP declared, a few kB
    with pytest.raises(UndecodableImage) as refused:
        decode_rgb(buffer.getvalue())
    assert refused.value.reason == "decompression_bomb" and refused.value.size == (15000, 14000)
    assert verify_image(buffer.getvalue(), 2_000_000, MAX_PIXELS) == ("decompression_bomb", 15000, 14000, "")
    for data, reason in [
        (b"", "empty"),
        (b"no image" * 10, "not_an_image"),
        (jpeg(64, 48, 0)[:300], "truncated"),
    ]:
        with pytest.raises(UndecodableImage, match=reason):
            decode_rgb(data)


def test_a_190_mp_image_passes_every_stage_and_a_broken_one_is_skipped_with_its_key(
    giant_jpeg, tiny_vae_directory, tmp_path
):
    # Ingest: decoded in full, kept with its real size.
    assert verify_image(giant_jpeg, 2_000_000, MAX_PIXELS) == ("", GIANT_SIDE, GIANT_SIDE, "JPEG")

    # Latents: one images shard with the giant, three small images and one truncated since ingest.
    small = {key: jpeg(400, 300, seed) for seed, key in enumerate(["a", "b", "c"])}
    rows = [("a", small["a"], 400, 300), ("b", small["b"], 400, 300), ("c", small["c"], 400, 300),
            ("g", giant_jpeg, GIANT_SIDE, GIANT_SIDE), ("t", jpeg(400, 300, 9)[:2000], 400, 300)]  # fmt: skip
    images_dir, latents_dir = tmp_path / "images", tmp_path / "latents"
    images_dir.mkdir()
    latents_dir.mkdir()

    def write_images(rows):
        table = pa.table({"key": [r[0] for r in rows], "image": pa.array([r[1] for r in rows], pa.binary()),
                          "width": pa.array([r[2] for r in rows], pa.int32()),
                          "height": pa.array([r[3] for r in rows], pa.int32())})  # fmt: skip
        pq.write_table(table, images_dir / "00000.parquet")

    write_images(rows)
    # One target size (64², no anchors): every sample lands in the same bucket, so batches are full.
    config = LatentConfig(
        policy=CropPolicy(input_side=64, min_side=64, max_side=64, step=64, anchor_share=0),
        samples_per_image=2,  # each of the giant's samples costs ~2 s of resizing in the latent stage
        batch_size=8,
        holdout_fraction=0,
        vae=str(tiny_vae_directory),
    )
    from pipelines.common.vae_source import load_frozen_vae

    vae, source = load_frozen_vae(config.vae, "cpu")
    stats = encode_shard(str(images_dir / "00000.parquet"), str(latents_dir), vae, source, config)
    assert stats["samples"] == 8 and stats["images_used"] == 4  # the giant gave its 2 samples
    assert stats["skipped"] == {"truncated": 1} and stats["undecodable"] == {"t": "truncated"}
    giant_rows = [i for i, key in enumerate(pq.read_table(latents_dir / "00000.parquet")["key"].to_pylist())
                  if key == "g"]  # fmt: skip
    assert len(giant_rows) == 2

    # Training: the giant's ground truth decodes; "a" damaged after the latent stage is replaced, not fatal.
    write_images([(r[0], r[1][:1500] if r[0] == "a" else r[1], *r[2:]) for r in rows])
    data = LatentBatches(str(latents_dir), str(images_dir), global_batch=4, seed=0)
    try:
        assert data.per_epoch == 2
        giants_seen = 0
        for index in range(data.per_epoch):
            latents, truth = data.batch(index, rank=0, world_size=1)
            assert latents.shape == (4, 4, 8, 8) and truth.shape == (4, 3, 64, 64)
            assert torch.isfinite(truth).all() and truth.abs().max() <= 1.0
            giants = [i for i, ref in enumerate(data.global_batch_refs(index)) if ref.row in giant_rows]
            colour = torch.tensor([90, 120, 30]).float() / 127.5 - 1.0  # the giant's one colour: its truth's
            assert torch.allclose(truth[giants].mean(dim=(2, 3)), colour.expand(len(giants), 3), atol=0.02)
            giants_seen += len(giants)
        assert giants_seen == 2
        assert data.skipped == {"a": "truncated"}
    finally:
        data.close()
