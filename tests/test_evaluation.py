"""The evaluation stage on the embedded source: latent-file validation (pure), then the real stage on Ray
(actors, part files, table, MLflow) with a tiny decoder, and a resume that scores only the missing chunk."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import infgen
from jobs.cli import run_arguments
from pipelines.common.holdout import held_out_images, is_held_out
from pipelines.evaluation.sources import load_latent_file


def scaled_latents(count, seed=0):
    return np.random.default_rng(seed).standard_normal((count, 4, 8, 8)).astype(np.float32)


def test_latent_files_load_in_every_format(tmp_path):
    latents = scaled_latents(3)
    np.save(tmp_path / "a.npy", latents)
    np.savez(tmp_path / "b.npz", samples=latents)
    torch.save({"latents": torch.from_numpy(latents)}, tmp_path / "c.pt")
    for name in ("a.npy", "b.npz", "c.pt"):
        assert np.array_equal(load_latent_file(str(tmp_path / name), 4), latents)


def test_latent_shards_of_our_own_load(embedded_latents):
    shard = sorted(embedded_latents["latents"].glob("*.parquet"))[0]
    loaded = load_latent_file(str(shard), 4)
    assert loaded.shape == (pq.read_metadata(shard).num_rows, 4, 8, 8)


@pytest.mark.parametrize(
    "array, message",
    [
        (scaled_latents(2).transpose(0, 2, 3, 1), "channels-last"),
        (scaled_latents(2)[:, :3], "3 channels, the VAE has 4"),
        (scaled_latents(2) / 0.18215, "unscaled VAE latents"),
        (np.full((2, 4, 8, 8), np.nan, np.float32), "NaN"),
        (np.zeros((4, 8), np.float32), "expected \\(N, C, h, w\\)"),
    ],
)
def test_bad_latent_files_are_refused_with_their_name(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=message) as error:
        load_latent_file(str(path), 4)
    assert str(path) in str(error.value)


def test_too_few_held_out_images_is_a_clear_error(embedded_latents, tmp_path):
    arguments = [
        "evaluate",
        "--decoder",
        str(tmp_path),
        "--images",
        str(embedded_latents["images"]),
        "--latents",
        str(embedded_latents["latents"]),
        "--output",
        str(tmp_path / "eval"),
    ]
    (tmp_path / "model.safetensors").write_bytes(b"")
    refs = held_out_images(str(embedded_latents["images"]), str(embedded_latents["latents"]), 1000)
    if len(refs) >= 4:
        pytest.skip("this ingest holds enough images out")  # depends on the session ingest's size
    with pytest.raises(ValueError, match=f"only {len(refs)} held-out image"):
        run_arguments(arguments)
    assert not (tmp_path / "eval").exists()  # refused before anything is written


def test_held_out_images_are_exactly_those_the_latent_stage_skipped(embedded_latents):
    refs = held_out_images(str(embedded_latents["images"]), str(embedded_latents["latents"]), 1000)
    config = embedded_latents["manifest"]["config"]
    assert refs and all(is_held_out(ref["key"], config["holdout_fraction"], config["seed"]) for ref in refs)
    assert embedded_latents["manifest"]["counts"]["skipped"]["held_out"] == len(refs)
    trained = set()
    for shard in embedded_latents["latents"].glob("*.parquet"):
        trained |= set(pq.read_table(shard, columns=["key"]).column("key").to_pylist())
    assert trained and not trained & {ref["key"] for ref in refs}


def evaluate(decoder, embedded_latents, output, *extra):
    # Without --latents every ingested image is evaluated (a separate held-out ingest): the session's small
    # ingest holds too few images out for the distribution metrics.
    arguments = ["evaluate", "--decoder", str(decoder), "--images", str(embedded_latents["images"]),
                 "--output", str(output), "--preset", "embedded", "--max-images", "12", "--input-side", "64",
                 "--sizes", "64", "96x128", "--tracking-uri", f"sqlite:///{output.parent / 'mlflow.db'}",
                 *extra]  # fmt: skip
    return run_arguments(arguments)


@pytest.fixture(scope="module")
def evaluation(embedded_latents, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    torch.manual_seed(0)
    decoder = infgen.save(infgen.InfGen(infgen.preset("tiny", in_distribution_scale=2.0)), root / "decoder")
    np.save(root / "dit.npy", scaled_latents(5, seed=1))
    manifest = evaluate(decoder, embedded_latents, root / "eval", "--latent-file", f"dit={root / 'dit.npy'}")
    return {"root": root, "decoder": decoder, "manifest": manifest}


def test_plugin_gains_table_covers_every_source_size_and_decoder(evaluation):
    manifest = evaluation["manifest"]
    rows = {(r["source"], r["size"], r["decoder"]): r for r in manifest["rows"]}
    assert set(rows) == {(source, size, decoder) for source in ("reconstruction", "dit")
                         for size in ("64x64", "96x128") for decoder in ("vae+resize", "infgen")}  # fmt: skip
    for (source, _, decoder), row in rows.items():
        assert all(
            np.isfinite(row[m]) for m in ("fid", "kid", "sfid", "fidp", "sfidp", "precision", "recall")
        )
        assert ("psnr" in row) == (source == "reconstruction")  # no ground truth for sampled latents
        assert ("fid_change_pct" in row) == (decoder == "infgen")
    # An untrained decoder is far from the stock decoder: the table has to say so.
    ours, base = rows[("reconstruction", "64x64", "infgen")], rows[("reconstruction", "64x64", "vae+resize")]
    assert base["psnr"] > ours["psnr"] + 5 and base["fid"] < ours["fid"]
    assert ours["psnr_change_pct"] == pytest.approx(
        100 * (ours["psnr"] - base["psnr"]) / base["psnr"], abs=0.01
    )
    assert manifest["feature_extractor_is_substitute"] and "SUBSTITUTE" in manifest["feature_extractor"]
    output = evaluation["root"] / "eval"
    table = (output / "plugin_gains.md").read_text()
    assert "| reconstruction | 96x128 | infgen |" in table and "SUBSTITUTE" in table
    assert sorted(p.name for p in (output / "grids").iterdir()) == [
        "dit_64x64.png",
        "dit_96x128.png",
        "reconstruction_64x64.png",
        "reconstruction_96x128.png",
    ]


def test_evaluation_is_logged_to_mlflow(evaluation):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{evaluation['root'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("infgen-eval")
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.data.metrics["reconstruction.64x64.infgen.psnr"] == pytest.approx(
        next(r["psnr"] for r in evaluation["manifest"]["rows"]
             if (r["source"], r["size"], r["decoder"]) == ("reconstruction", "64x64", "infgen")))  # fmt: skip
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plugin_gains.json", "plugin_gains.md", "manifest.json", "grids"} <= artifacts
    table = json.loads(open(client.download_artifacts(run.info.run_id, "plugin_gains.json")).read())
    assert len(table["data"]) == 8  # MLflow's table format: columns + data rows
    assert len(client.list_artifacts(run.info.run_id, "grids")) == 4


def test_rerun_scores_only_missing_chunks_and_gives_the_same_table(evaluation, embedded_latents, capsys):
    output = evaluation["root"] / "eval"
    parts = sorted((output / "parts").rglob("*.npz"))
    parts[-1].unlink()
    capsys.readouterr()
    # with another number of actors: how it runs, not what it scores, so the resume is accepted
    again = evaluate(evaluation["decoder"], embedded_latents, output, "--latent-file",
                     f"dit={evaluation['root'] / 'dit.npy'}", "--workers", "2")  # fmt: skip
    assert f"{len(parts)} chunks, 1 to score" in capsys.readouterr().out
    # The rescored chunk runs in a fresh actor: equal up to float32 rounding of the recomputed features.
    for row, before in zip(again["rows"], evaluation["manifest"]["rows"], strict=True):
        assert row.keys() == before.keys()
        for name, value in row.items():
            assert value == (pytest.approx(before[name], rel=1e-4, abs=1e-6) if isinstance(value, float)
                             else before[name]), name  # fmt: skip


def test_other_inputs_on_the_same_output_are_refused(evaluation, embedded_latents):
    with pytest.raises(ValueError, match="another decoder, other inputs or another config"):
        evaluate(evaluation["decoder"], embedded_latents, evaluation["root"] / "eval")  # no dit source now
