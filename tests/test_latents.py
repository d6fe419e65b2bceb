"""The latent stage on the embedded source: the crop policy (pure), then real Ray Data actors and the VAE."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from infgen.images import from_uint8
from jobs.cli import run_arguments
from pipelines.common.crops import CropPolicy, buckets, crop_pair, decode_rgb, plan_crops
from pipelines.common.latent_shards import read_latents
from pipelines.latents.stage import latent_digest

POLICY = CropPolicy()


def test_buckets_respect_sides_and_aspect_ratio():
    sizes = buckets(POLICY)
    assert (512, 512) in sizes and (512, 1024) in sizes and (1024, 512) in sizes
    assert all(512 <= min(s) and max(s) <= 1024 and 0.5 <= s[1] / s[0] <= 2 for s in sizes)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in sizes)


def test_crops_never_upscale_and_are_deterministic():
    plans = plan_crops("000001", 1500, 2200, 200, seed=3, policy=POLICY)
    assert plans == plan_crops("000001", 1500, 2200, 200, seed=3, policy=POLICY)
    assert plans != plan_crops("000001", 1500, 2200, 200, seed=4, policy=POLICY)
    for sample in plans:
        assert sample.height >= sample.target_height and sample.width >= sample.target_width
        assert 0 <= sample.top <= 1500 - sample.height and 0 <= sample.left <= 2200 - sample.width
        crop_aspect = sample.width / sample.height
        assert crop_aspect == pytest.approx(sample.target_width / sample.target_height, rel=0.01)
    anchors = sum(s.target_height == s.target_width and s.target_height in (512, 1024) for s in plans)
    assert 0.15 < anchors / len(plans) < 0.5  # 25 % anchors, plus square buckets drawn by chance


def test_small_images_get_only_the_targets_that_fit():
    assert plan_crops("k", 400, 600, 4, seed=0, policy=POLICY) == []
    plans = plan_crops("k", 600, 700, 50, seed=0, policy=POLICY)
    assert plans and all(s.target_height <= 600 and s.target_width <= 700 for s in plans)


def latents(embedded_images, output, *extra):
    tracking = f"sqlite:///{output.parent / 'mlflow.db'}"
    arguments = ["latents", "--images", str(embedded_images["images"]), "--output", str(output),
                 "--preset", "smoke", "--tracking-uri", tracking, *extra]  # fmt: skip
    return run_arguments(arguments)


@pytest.fixture(scope="module")
def latent_run(embedded_images, tmp_path_factory):
    output = tmp_path_factory.mktemp("latents") / "first"
    return {"output": output, "manifest": latents(embedded_images, output)}


def test_every_image_is_accounted_for(embedded_images, latent_run):
    counts = latent_run["manifest"]["counts"]
    assert counts["images"] == embedded_images["manifest"]["counts"]["buckets"]["kept"]
    assert counts["images_used"] + sum(counts["skipped"].values()) == counts["images"]
    assert counts["samples"] == 4 * counts["images_used"] > 0
    assert counts["undecodable"] == {}  # ingest verified every image, under the same policy
    assert latent_run["manifest"]["latent_shape"] == [4, 8, 8]
    assert "substitute" in latent_run["manifest"]["vae"]


def test_a_sample_is_its_crop_encoded_with_its_own_noise(embedded_images, latent_run):
    from pipelines.common.vae_source import load_frozen_vae

    shard = sorted(latent_run["output"].glob("*.parquet"))[0]
    table = pq.read_table(shard)
    row = table.slice(3, 1).to_pylist()[0]
    images = pq.read_table(embedded_images["images"] / shard.name)
    index = images.column("key").to_pylist().index(row["key"])
    image = decode_rgb(images.column("image")[index].as_py())
    sample = plan_crops(row["key"], image.height, image.width, 4, seed=0, policy=CropPolicy(64, 64, 128, 32))
    sample = sample[row["sample_index"]]
    assert (sample.top, sample.left, sample.height, sample.width) == (
        row["crop_top"], row["crop_left"], row["crop_height"], row["crop_width"])  # fmt: skip
    encoder_input, truth = crop_pair(image, sample, 64)
    assert truth.shape == (row["target_height"], row["target_width"], 3)
    vae, _ = load_frozen_vae(None)
    mean, std = vae.encode_posterior(from_uint8(encoder_input)[None])
    noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(row["seed"]))
    expected = (mean[0] + std[0] * noise).numpy()
    np.testing.assert_allclose(read_latents(table)[3], expected, atol=1e-4)
    assert row["scaling_factor"] == pytest.approx(vae.scaling_factor)


def test_latents_are_identical_across_runs_and_resume_redoes_only_missing_shards(
    embedded_images, latent_run, tmp_path, capsys
):
    second = tmp_path / "second"
    latents(embedded_images, second)
    assert latent_digest(str(second)) == latent_digest(str(latent_run["output"]))
    # a crash that lost one shard: only that one is encoded again, to the same bytes
    (second / "00001.parquet").unlink()
    (second / "00001_stats.json").unlink()
    capsys.readouterr()
    manifest = latents(embedded_images, second)
    assert "1 to encode" in capsys.readouterr().out
    assert latent_digest(str(second)) == latent_digest(str(latent_run["output"]))
    assert manifest["counts"] == latent_run["manifest"]["counts"]


def test_another_config_on_the_same_output_is_refused(embedded_images, latent_run):
    before = (latent_run["output"] / "manifest.json").read_text()
    with pytest.raises(ValueError, match="latents made from other images or another config"):
        latents(embedded_images, latent_run["output"], "--samples-per-image", "3")
    assert (latent_run["output"] / "manifest.json").read_text() == before
    assert json.loads(before)["status"] == "complete"
    # how many actors run it, with how much memory, changes no latent: a resume may change them
    resources = ["--encoders", "1", "--encoder-memory-gib", "0.5"]
    manifest = latents(embedded_images, latent_run["output"], *resources)
    assert manifest["counts"] == latent_run["manifest"]["counts"]


def test_a_bf16_encoder_writes_float32_latents_close_to_fp32(embedded_images, latent_run, tmp_path):
    """The GPU actors' dtype, on the CPU: inputs cast to the encoder's dtype, latents back to float32."""
    from pipelines.common.vae_source import load_frozen_vae
    from pipelines.latents.config import SMOKE
    from pipelines.latents.encode import encode_shard

    vae, source = load_frozen_vae(None)
    vae.autoencoder.to(torch.bfloat16)
    shard = str(embedded_images["images"] / "00000.parquet")
    stats = encode_shard(shard, str(tmp_path), vae, source, SMOKE)
    table = pq.read_table(tmp_path / "00000.parquet")
    assert table.schema.field("latent").type.value_type == "float"
    reference = read_latents(pq.read_table(latent_run["output"] / "00000.parquet"))
    bf16 = read_latents(table)
    assert bf16.shape == reference.shape and np.isfinite(bf16).all()
    assert np.abs(bf16 - reference).mean() < 0.05 * np.abs(reference).mean()
    assert stats["finished"] >= stats["started"] and stats["samples"] == len(table)


def test_actors_reserving_more_memory_than_any_node_offers_are_announced(ray_address, capsys):
    from pipelines.common.actor_pool import _warn_if_no_node_fits

    _warn_if_no_node_fits("ShardEncoder", 0.5)
    assert "warning" not in capsys.readouterr().out
    _warn_if_no_node_fits("ShardEncoder", 100_000)
    out = capsys.readouterr().out
    assert "each ShardEncoder actor reserves 100000 GiB" in out and "--encoder-memory-gib" in out
