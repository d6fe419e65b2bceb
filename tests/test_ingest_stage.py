"""The ingest stage end to end on the embedded source: real Ray, real img2dataset over HTTP on 127.0.0.1,
real Parquet, real MLflow (SQLite). One ingest run is shared by the module's tests."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import run_arguments
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.embedded_source import KINDS, make_metadata
from pipelines.ingest.layout import IngestLayout
from pipelines.ingest.stage import run_selection

ROWS, SEED, SHARD = 72, 10, 20  # seed 10 draws every kind of row at 72 rows (checked below)
BUCKET_OF_KIND = {
    "ok": "kept",
    "redirect": "kept",
    "bounce": "download_failed.refused_cloud_metadata_address",  # refused where the redirect connects
    "small": "filtered.too_few_pixels",
    "bad_url": "filtered.invalid_url",
    "private": "refused.private_address",
    "missing": "download_failed.http_404",
    "slow": "download_failed.timeout",
    "truncated": "verification_failed.truncated",
    "corrupt": "verification_failed.not_an_image",
    "lie": "verification_failed.too_few_pixels_actual",
}


def expected_buckets(rows: int, seed: int) -> Counter:
    frame = make_metadata(rows, "http://127.0.0.1:1", seed=seed)
    assert set(frame.attrs["kinds"]) == set(KINDS), "the source must exercise every kind of row"
    seen, expected = set(), Counter()
    for url, kind in zip(frame["URL"], frame.attrs["kinds"]):
        if kind == "duplicate":
            expected["duplicate_url" if url in seen else "kept"] += 1
        else:
            expected[BUCKET_OF_KIND[kind]] += 1
        seen.add(url)
    return expected


def flat_buckets(buckets: dict) -> Counter:
    flat = Counter()
    for name, value in buckets.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{reason}": n for reason, n in value.items()})
        elif value:
            flat[name] = value
    return flat


def ingest(*arguments: str) -> dict:
    return run_arguments(["ingest", *arguments])


@pytest.fixture(scope="module")
def embedded_run(ray_address, tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    common = ["--samples-per-shard", str(SHARD), "--seed", str(SEED), "--tracking-uri", tracking]
    # an fsspec URL, as on a cluster (s3://, gs://...): nothing may assume a plain local path
    handler_before = signal.getsignal(signal.SIGINT)
    manifest = ingest("--embedded", str(ROWS), "--output", f"file://{root / 'first'}", *common)
    handler_after = signal.getsignal(signal.SIGINT)
    return {
        "root": root,
        "manifest": manifest,
        "tracking": tracking,
        "common": common,
        "sigint_handlers": (handler_before, handler_after),
    }


def test_every_row_lands_in_the_bucket_its_kind_predicts(embedded_run):
    manifest = embedded_run["manifest"]
    assert manifest["status"] == "complete"
    assert manifest["counts"]["input_rows"] == ROWS
    assert flat_buckets(manifest["counts"]["buckets"]) == expected_buckets(ROWS, SEED)
    assert len(manifest["shards"]) == -(-manifest["selection"]["rows"] // SHARD)


def test_ctrl_c_still_interrupts_after_a_download(embedded_run):
    # img2dataset installs a SIGINT handler that exits with status 0; the stage must put the caller's back
    before, after = embedded_run["sigint_handlers"]
    assert after is before


def test_manifest_on_disk_records_inputs_config_and_code(embedded_run):
    path = embedded_run["root"] / "first" / "manifest.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["counts"] == embedded_run["manifest"]["counts"]
    (source,) = on_disk["inputs"]
    assert source["path"].endswith("source/metadata.parquet") and len(source["sha256"]) == 64
    assert IngestConfig.from_dict(on_disk["config"]).filters.seed == SEED
    assert on_disk["code_version"]["infgen"]
    assert not list((embedded_run["root"] / "first" / "download").glob("*.parquet"))  # raw shards removed


def test_shards_read_back_with_pyarrow_and_ray_data(embedded_run):
    import ray

    images = embedded_run["root"] / "first" / "images"
    table = pq.read_table(images)
    kept = embedded_run["manifest"]["counts"]["buckets"]["kept"]
    assert table.num_rows == kept
    assert len(set(table.column("key").to_pylist())) == kept
    for row in table.slice(0, 3).to_pylist():
        with Image.open(io.BytesIO(row["image"])) as image:
            assert image.size == (row["width"], row["height"])
            assert image.width * image.height > 2_000_000
        assert row["url"].startswith("http://127.0.0.1:") and row["caption"].startswith("synthetic scene")
    dataset = ray.data.read_parquet(str(images), columns=["key", "width", "height"])
    assert dataset.count() == kept
    assert min(r["width"] * r["height"] for r in dataset.take_all()) > 2_000_000


def test_stage_is_logged_to_mlflow(embedded_run):
    import mlflow

    client = mlflow.MlflowClient(embedded_run["tracking"])
    experiment = client.get_experiment_by_name("infgen-ingest")
    (run,) = client.search_runs([experiment.experiment_id], max_results=5)[:1]
    assert run.data.metrics["buckets.kept"] == embedded_run["manifest"]["counts"]["buckets"]["kept"]
    assert run.data.metrics["input_rows"] == ROWS
    assert run.data.params["config.filters.seed"] == str(SEED)
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["manifest.json"]
    assert run.info.artifact_uri.startswith((embedded_run["root"] / "mlartifacts").as_uri())  # not ./mlruns


def test_regenerate_rebuilds_the_same_selection_and_keys(embedded_run):
    root = embedded_run["root"]
    rebuilt = ingest(
        "--regenerate", str(root / "first" / "manifest.json"), "--output", str(root / "again"),
        "--tracking-uri", embedded_run["tracking"],
    )  # fmt: skip
    original = embedded_run["manifest"]
    assert rebuilt["selection"]["sha256"] == original["selection"]["sha256"]
    assert rebuilt["kept_keys_sha256"] == original["kept_keys_sha256"]
    assert rebuilt["counts"] == original["counts"]

    def keys(folder):
        return sorted(pq.read_table(root / folder / "images", columns=["key"]).column(0).to_pylist())

    assert keys("again") == keys("first")


def test_regenerate_refuses_changed_inputs(embedded_run, tmp_path):
    manifest = json.loads((embedded_run["root"] / "first" / "manifest.json").read_text())
    copy = tmp_path / "metadata.parquet"
    copy.write_bytes(Path(manifest["inputs"][0]["path"]).read_bytes() + b"\0")
    manifest["inputs"][0]["path"] = str(copy)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="metadata.parquet changed since manifest"):
        ingest("--regenerate", str(tmp_path / "manifest.json"), "--output", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_rerun_with_another_config_refuses_to_mix_selections(embedded_run):
    before = (embedded_run["root"] / "first" / "manifest.json").read_bytes()
    with pytest.raises(
        ValueError, match="already holds a selection made from other inputs or another config"
    ):
        ingest("--embedded", str(ROWS), "--output", str(embedded_run["root"] / "first"),
               *embedded_run["common"], "--min-aesthetic", "6.5")  # fmt: skip
    assert (embedded_run["root"] / "first" / "manifest.json").read_bytes() == before  # nothing lost


def test_loopback_and_private_hosts_are_refused_without_an_allow_list(ray_address, tmp_path):
    frame = make_metadata(ROWS, "http://127.0.0.1:9", seed=SEED)
    metadata = tmp_path / "metadata.parquet"
    frame.to_parquet(metadata, index=False)
    layout = IngestLayout(str(tmp_path / "out"))
    layout.make_directories()
    inputs = [{"path": str(metadata), "sha256": "0" * 64}]
    record = run_selection(inputs, layout, IngestConfig(), progress=lambda line: None)
    kinds = Counter(frame.attrs["kinds"])
    # every row on the embedded server except those the filters drop first
    loopback_rows = ROWS - kinds["small"] - kinds["bad_url"] - kinds["private"]
    assert record["counts"]["refused_loopback_address"] == loopback_rows
    assert record["counts"]["refused_private_address"] == kinds["private"]
    assert record["selected"] == 0


def test_killed_driver_resumes_without_redownloading(ray_address, tmp_path):
    """SIGKILL the driver's whole process group mid-download, rerun the same command, and check that the
    shards finished before the kill were not fetched again and that no key is missing or doubled."""
    output = tmp_path / "killed"
    command = [
        sys.executable, "-m", "jobs.cli", "ingest", "--embedded", "90", "--output", str(output),
        "--samples-per-shard", "6", "--seed", str(SEED), "--ray-address", ray_address,
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    driver = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    stats_dir = output / "download"
    deadline = time.monotonic() + 300
    while not list(stats_dir.glob("*_stats.json")):  # poll the file system for the condition, with a deadline
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard finished within 300 s"
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in stats_dir.glob("*_stats.json")}
    assert not (output / "manifest.json").exists()
    total_shards = -(-json.loads((output / "selection" / "selection.json").read_text())["selected"] // 6)
    assert 0 < len(done_before) < total_shards, "the kill must land mid-download"

    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "taking over the lock" in finished.stdout
    for name, mtime in done_before.items():
        assert (stats_dir / name).stat().st_mtime_ns == mtime, f"shard {name} was downloaded again"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert flat_buckets(manifest["counts"]["buckets"]) == expected_buckets(90, SEED)
    kept = pq.read_table(output / "images", columns=["key"]).column(0).to_pylist()
    rejected = pq.read_table(output / "rejects", columns=["key"]).column(0).to_pylist()
    assert len(set(kept) | set(rejected)) == len(kept) + len(rejected) == manifest["selection"]["rows"]
