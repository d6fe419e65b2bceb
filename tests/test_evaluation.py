"""The evaluation stage on the embedded source: latent-file validation (pure), the image-folder source and
the table (pure), then the real stage on Ray (actors, part files, table, grids, MLflow) with a tiny decoder,
held-out images, a folder of photographs and a latent file, and a resume that scores only the missing
chunk."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import infgen
from jobs.cli import run_arguments
from pipelines.common.holdout import held_out_images, is_held_out
from pipelines.evaluation.image_folder import folder_images, split_by_fit
from pipelines.evaluation.sources import load_latent_file
from pipelines.evaluation.table import markdown, relative_changes


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
    photos = write_photos(root / "photos")
    manifest = evaluate(decoder, embedded_latents, root / "eval", "--latent-file", f"dit={root / 'dit.npy'}",
                        "--images-dir", str(photos))  # fmt: skip
    return {"root": root, "decoder": decoder, "manifest": manifest, "photos": photos}


def write_photos(folder):
    """Two photographs: one large enough for 96×128, one (70×70) too small for it after a centred crop."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(folder / "large.png")
    Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(folder / "small.jpg")
    (folder / "notes.txt").write_text("not an image: ignored")
    return folder


def test_plugin_gains_table_covers_every_source_size_and_decoder(evaluation):
    manifest = evaluation["manifest"]
    rows = {(r["source"], r["size"], r["decoder"]): r for r in manifest["rows"]}
    expected = {(source, size, decoder) for source in ("held-out", "dit") for size in ("64x64", "96x128")
                for decoder in ("vae+resize", "infgen")}  # fmt: skip
    expected |= {
        ("photos", size, decoder) for size in ("64x64", "96x128") for decoder in ("vae+resize", "infgen")
    }
    assert set(rows) == expected
    for (source, _, decoder), row in rows.items():
        has_distribution = source != "photos"  # a few photographs: full-reference metrics only
        assert all(
            (m in row and np.isfinite(row[m])) == has_distribution
            for m in ("fid", "kid", "sfid", "fidp", "sfidp", "precision", "recall")
        )
        assert ("psnr" in row) == (source != "dit")  # no ground truth for sampled latents
        assert ("psnr_change_pct" in row) == (decoder == "infgen" and source != "dit")
        assert "kid_change_pct" not in row  # a ratio of near-zero unbiased estimates is noise
    # An untrained decoder is far from the stock decoder: the table has to say so.
    ours, base = rows[("held-out", "64x64", "infgen")], rows[("held-out", "64x64", "vae+resize")]
    assert base["psnr"] > ours["psnr"] + 5 and base["fid"] < ours["fid"]
    assert ours["psnr_change_pct"] == pytest.approx(
        100 * (ours["psnr"] - base["psnr"]) / base["psnr"], abs=0.01
    )
    # The small photograph has no 96×128 truth without upscaling: left out there, and said so.
    assert (
        rows[("photos", "64x64", "infgen")]["images"] == 2
        and rows[("photos", "96x128", "infgen")]["images"] == 1
    )
    assert manifest["image_folder"]["too_small"] == {"96x128": ["small.jpg (70x70)"]}
    assert manifest["feature_extractor_is_substitute"] and "SUBSTITUTE" in manifest["feature_extractor"]
    output = evaluation["root"] / "eval"
    table = (output / "plugin_gains.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| source | size | decoder | images |")
    sources = [line.split("|")[1].strip() for line in lines[2:] if line.startswith("| ")]
    assert sources == ["held-out"] * 4 + ["photos"] * 4 + ["dit"] * 4  # image sources first
    assert (
        "| held-out | 96x128 | InfGen | 12 |" in table and "| photos | 96x128 | stock + resize | 1 |" in table
    )
    footer = table.split("\n\n", 1)[1]
    assert "SUBSTITUTE random-init Inception" in footer and "RANDOM AlexNet trunk" in footer
    assert "small.jpg (70x70)" in footer and "PSNR/SSIM/LPIPS only" in footer
    assert sorted(p.name for p in (output / "grids").iterdir()) == [
        f"{source}_{size}.png" for source in ("dit", "held-out", "photos") for size in ("64x64", "96x128")
    ]


def test_grids_are_labelled_and_show_a_zoomed_centre(evaluation):
    from pipelines.common.grids import GAP, LARGEST_FONT

    grid = np.asarray(Image.open(evaluation["root"] / "eval" / "grids" / "held-out_96x128.png"))
    strip = LARGEST_FONT + 6  # the label strip: white paper with dark text over each column
    assert (grid[:strip] < 128).any() and (grid[:strip] == 255).mean() > 0.5
    # 3 rows (truth | stock + resize | InfGen), each followed by its zoomed centre, under the labels
    assert grid.shape == (strip + GAP + 6 * 96 + 5 * GAP, 3 * 128 + 2 * GAP, 3)
    truth = grid[strip + GAP : strip + GAP + 96, :128]
    zoom = grid[strip + 2 * GAP + 96 : strip + 2 * GAP + 192, :128]
    # below the caption in its corner, the zoom is the truth's centre, each pixel repeated 4×
    centre = truth[36:60, 48:80]
    assert np.array_equal(zoom[40:, :], centre.repeat(4, 0).repeat(4, 1)[40:, :])


def test_evaluation_is_logged_to_mlflow(evaluation):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{evaluation['root'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("infgen-eval")
    # opens on its runs in the MLflow UI, not on the GenAI overview
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.data.metrics["held-out.64x64.infgen.psnr"] == pytest.approx(
        next(r["psnr"] for r in evaluation["manifest"]["rows"]
             if (r["source"], r["size"], r["decoder"]) == ("held-out", "64x64", "infgen")))  # fmt: skip
    assert "photos.96x128.infgen.lpips" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plugin_gains.json", "plugin_gains.md", "manifest.json", "grids"} <= artifacts
    table = json.loads(open(client.download_artifacts(run.info.run_id, "plugin_gains.json")).read())
    assert len(table["data"]) == 12  # MLflow's table format: columns + data rows
    assert len(client.list_artifacts(run.info.run_id, "grids")) == 6


def test_rerun_scores_only_missing_chunks_and_gives_the_same_table(evaluation, embedded_latents, capsys):
    output = evaluation["root"] / "eval"
    parts = sorted((output / "parts").rglob("*.npz"))
    parts[-1].unlink()
    capsys.readouterr()
    # with another number of actors: how it runs, not what it scores, so the resume is accepted
    again = evaluate(evaluation["decoder"], embedded_latents, output, "--latent-file",
                     f"dit={evaluation['root'] / 'dit.npy'}", "--images-dir", str(evaluation["photos"]),
                     "--workers", "2")  # fmt: skip
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


def test_an_image_folder_is_listed_checked_and_split_by_size(tmp_path):
    photos = write_photos(tmp_path / "photos")
    refs = folder_images(str(photos), 10)
    assert [(ref["key"], ref["height"], ref["width"]) for ref in refs] == [("large.png", 120, 160),
                                                                           ("small.jpg", 70, 70)]  # fmt: skip
    fitting, small = split_by_fit(refs, (96, 128))
    assert [ref["key"] for ref in fitting] == ["large.png"] and [ref["key"] for ref in small] == ["small.jpg"]
    assert [ref["key"] for ref in split_by_fit(refs, (64, 64))[0]] == ["large.png", "small.jpg"]
    assert len(folder_images(str(photos), 1)) == 1


BAD_FOLDERS = {
    "empty": ({}, "no image files in it"),
    "no images": ({"a.txt": b"x"}, "no image files"),
    "undecodable": ({"broken.png": b"\x89PNG not really"}, "broken.png cannot be decoded"),
}


@pytest.mark.parametrize("contents, message", BAD_FOLDERS.values(), ids=BAD_FOLDERS.keys())
def test_a_bad_image_folder_is_refused_naming_it(tmp_path, contents, message):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, payload in contents.items():
        (folder / name).write_bytes(payload)
    with pytest.raises(ValueError, match=message) as error:
        folder_images(str(folder), 10)
    assert str(folder) in str(error.value)
    with pytest.raises(ValueError, match="not a folder"):
        folder_images(str(tmp_path / "nowhere"), 10)


def test_relative_changes_leave_out_kid_and_near_zero_baselines():
    base = {"fid": 10.0, "kid": 0.002, "psnr": 20.0, "lpips": 0.0, "ssim": 0.01, "recall": 0.5}
    ours = {"fid": 12.0, "kid": 0.004, "psnr": 22.0, "lpips": 0.1, "ssim": 0.02, "recall": 0.25}
    assert relative_changes(ours, base) == {"fid_change_pct": 20.0, "psnr_change_pct": 10.0,
                                            "recall_change_pct": -50.0}  # fmt: skip


def test_the_table_footer_carries_the_notes():
    rows = [{"source": "photos", "size": "64x64", "decoder": "infgen", "images": 2.0, "psnr": 20.0}]
    text = markdown(rows, ["LPIPS: a RANDOM AlexNet trunk"])
    assert "| photos | 64x64 | InfGen | 2 | 20.00 |" in text and text.rstrip().endswith(
        "- LPIPS: a RANDOM AlexNet trunk"
    )
