"""Shard integrity (pipelines/common/shard_integrity.py): each stage records its shards' sha256 and size in
its manifest; readers check sizes with one listing before any work and the sha256 where a shard is read; a
damaged shard is one line naming the file, the stage that wrote it and what to do; the latent stage's resume
and the workflow's rerun redo only the damaged shard, then the stages downstream."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from jobs.cli import main
from jobs.workflow.records import output_hash
from pipelines.common.shard_integrity import (
    DamagedShard,
    check_shards,
    read_verified,
    shard_files,
    write_parquet,
)


def write_stage(folder: Path, shards: dict[str, int], prefix: str = "") -> dict:
    """A finished stage's output: `shards` (name → rows) written with their records, and its manifest."""
    import fsspec

    filesystem = fsspec.filesystem("file")
    (folder / prefix).mkdir(parents=True, exist_ok=True)
    records = {}
    for name, rows in shards.items():
        table = pa.table({"key": [f"{name}-{row}" for row in range(rows)]})
        records[f"{prefix}{name}"] = write_parquet(table, filesystem, str(folder / prefix / name))
    manifest = {"status": "complete", "shard_files": shard_files("latents", records)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


# --- the module, without Ray --------------------------------------------------------------------------------
def test_a_record_is_the_written_files_hash_and_size(tmp_path):
    import hashlib

    manifest = write_stage(tmp_path, {"00000.parquet": 5})
    record = manifest["shard_files"]["files"]["00000.parquet"]
    data = (tmp_path / "00000.parquet").read_bytes()
    assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert not list(tmp_path.glob("*.tmp"))
    records = check_shards(str(tmp_path))
    assert read_verified(str(tmp_path / "00000.parquet"), records) == data


def test_a_missing_truncated_or_foreign_shard_is_one_line_naming_it_and_its_stage(tmp_path):
    write_stage(tmp_path, {"00000.parquet": 5, "00001.parquet": 5})
    shard = tmp_path / "00001.parquet"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DamagedShard) as error:
        check_shards(str(tmp_path), "training latents")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"training latents: shard {shard} is 100 bytes, the latents stage wrote {size}")
    assert f"manifest {tmp_path / 'manifest.json'}" in message and "rerun the latents stage" in message
    shard.unlink()
    with pytest.raises(DamagedShard, match=f"shard {shard} is missing: the latents stage wrote it"):
        check_shards(str(tmp_path))
    write_stage(tmp_path, {"00000.parquet": 5})
    (tmp_path / "extra.parquet").write_bytes(b"PAR1")
    with pytest.raises(DamagedShard, match="extra.parquet was not written by the latents stage .* remove it"):
        check_shards(str(tmp_path))


def test_same_size_changed_bytes_fail_where_the_shard_is_read(tmp_path):
    write_stage(tmp_path, {"00000.parquet": 5})
    shard = tmp_path / "00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    records = check_shards(str(tmp_path))  # the listing cannot see it: the size is right
    with pytest.raises(DamagedShard, match=f"shard {shard} does not hold the bytes the latents stage wrote"):
        read_verified(str(shard), records)


def test_a_folder_is_vouched_for_by_the_manifest_beside_it_or_one_level_up(tmp_path):
    write_stage(tmp_path, {"00000.parquet": 3}, prefix="images/")
    records = check_shards(str(tmp_path / "images"))  # an ingest: INGEST/manifest.json lists images/…
    assert set(records.files) == {"00000.parquet"}
    (tmp_path / "images" / "00000.parquet").unlink()
    with pytest.raises(DamagedShard, match="images/00000.parquet is missing"):
        check_shards(str(tmp_path / "images"))
    older = tmp_path / "older"  # a stage that finished before shards were recorded: nothing to check
    older.mkdir()
    (older / "manifest.json").write_text(json.dumps({"status": "complete", "manifest_version": 1}))
    assert check_shards(str(older)) is None


def test_the_workflow_output_hash_notices_a_missing_or_resized_shard_by_listing(tmp_path):
    write_stage(tmp_path, {"00000.parquet": 5, "00001.parquet": 5})
    digest = output_hash(str(tmp_path))
    assert digest is not None
    shard = tmp_path / "00001.parquet"
    original = shard.read_bytes()
    shard.write_bytes(original[:-1])
    assert output_hash(str(tmp_path)) is None
    shard.unlink()
    assert output_hash(str(tmp_path)) is None
    shard.write_bytes(original)
    assert output_hash(str(tmp_path)) == digest


# --- the stages -------------------------------------------------------------------------------------------
def test_the_stages_record_every_shard_they_write(embedded_latents):
    ingest = json.loads((embedded_latents["images"].parent / "manifest.json").read_text())
    assert ingest["manifest_version"] == 2 and ingest["shard_files"]["stage"] == "ingest"
    names = sorted(path.name for path in embedded_latents["images"].glob("*.parquet"))
    assert sorted(ingest["shard_files"]["files"]) == sorted(
        [f"images/{name}" for name in names] + [f"rejects/{name}" for name in names]
    )
    latents = json.loads((embedded_latents["latents"] / "manifest.json").read_text())
    assert latents["shard_files"]["stage"] == "latents" and sorted(latents["shard_files"]["files"]) == names
    for name, record in latents["shard_files"]["files"].items():
        assert (embedded_latents["latents"] / name).stat().st_size == record["bytes"]


def test_a_truncated_latent_shard_stops_training_with_one_line_before_ray_train(
    embedded_latents, tmp_path, capsys
):
    latents = tmp_path / "latents"
    shutil.copytree(embedded_latents["latents"], latents)
    shard = sorted(latents.glob("*.parquet"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    output = tmp_path / "run"
    capsys.readouterr()
    code = main(["train", "--preset", "stage1-small", "--latents", str(latents), "--images",
                 str(embedded_latents["images"]), "--output", str(output),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("infgen train:")]  # MLflow logs aside
    assert line.startswith(f"infgen train: stopped: shard {shard} is 1000 bytes, the latents stage wrote")
    assert line.endswith("rerun the latents stage (`infgen latents` with the same options, or `infgen run` "
                         "on the workflow) to write it again")  # fmt: skip
    assert not output.exists()  # refused on the driver: nothing written, no Ray Train run started


def test_the_latent_stage_reencodes_only_a_damaged_shard(embedded_latents, tmp_path, capsys):
    latents = tmp_path / "latents"
    shutil.copytree(embedded_latents["latents"], latents)
    shards = sorted(latents.glob("*.parquet"))
    damaged, kept = shards[0], shards[1:]
    original = damaged.read_bytes()
    damaged.write_bytes(original[: len(original) // 2])
    before = {path.name: path.stat().st_mtime_ns for path in kept}
    capsys.readouterr()
    code = main(["latents", "--images", str(embedded_latents["images"]), "--output", str(latents),
                 "--preset", "smoke", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"shard {damaged.name} is {len(original) // 2} bytes, {len(original)} when written" in out
    assert f"{len(shards) - 1} done earlier" in out and "1 to encode" in out
    assert damaged.read_bytes() == original  # encoded again, to the same bytes
    assert {path.name: path.stat().st_mtime_ns for path in kept} == before
    check_shards(str(latents))


def test_a_changed_image_shard_of_the_same_size_stops_the_latent_stage_with_one_line(
    embedded_images, tmp_path, capsys
):
    """Same size, other bytes: the listing cannot tell, the encoder that reads the shard can; its error comes
    back through Ray Data's wrapping as the one line, not a traceback from the command."""
    ingest = tmp_path / "ingest"
    shutil.copytree(embedded_images["images"].parent, ingest, ignore=shutil.ignore_patterns("_LOCK"))
    shard = sorted((ingest / "images").glob("*.parquet"))[0]
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))
    capsys.readouterr()
    code = main(["latents", "--images", str(ingest / "images"), "--output", str(tmp_path / "latents"),
                 "--preset", "smoke", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1, err
    (line,) = [line for line in err.splitlines() if line.startswith("infgen latents:")]
    assert line.startswith("infgen latents: stopped:") and shard.name in line and "ingest" in line, line


@pytest.mark.slow
def test_the_ingest_stage_downloads_again_only_a_lost_image_shard(embedded_images, tmp_path, capsys):
    ingest = tmp_path / "ingest"
    shutil.copytree(embedded_images["images"].parent, ingest)
    shards = sorted((ingest / "images").glob("*.parquet"))
    lost, kept = shards[0], shards[1:]
    original = lost.read_bytes()
    lost.unlink()
    with pytest.raises(DamagedShard, match=f"shard {lost} is missing: the ingest stage wrote it"):
        check_shards(str(ingest / "images"))
    before = {path.name: path.stat().st_mtime_ns for path in kept}
    capsys.readouterr()
    code = main(["ingest", "--embedded", "40", "--output", str(ingest), "--samples-per-shard", "12", "--seed",
                 "10", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"ingest: shard {lost.name}: images/{lost.name} missing or resized" in out
    assert "downloading it again" in out
    assert lost.read_bytes() == original  # the same images, verified the same way
    assert {path.name: path.stat().st_mtime_ns for path in kept} == before
    check_shards(str(ingest / "images"))


# --- the workflow -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_workflow_rerun_redoes_a_deleted_latent_shard_then_the_stages_downstream(embedded_images, tmp_path):
    from jobs.workflow import run_workflow

    images = str(embedded_images["images"])  # the session's ingest: this workflow starts at the latents
    workflow = {
        "name": "integrity",
        "run_dir": str(tmp_path / "run"),
        "experiment": "infgen-integrity",
        "stages": [
            {"name": "latents", "command": "latents", "options": {"images": images, "preset": "smoke"}},
            {"name": "stage1", "command": "train",
             "options": {"preset": "stage1-small", "steps": 2, "workers": 1, "latents": "{latents}",
                         "images": images}},
        ],
    }  # fmt: skip
    path = tmp_path / "integrity.yaml"
    path.write_text(yaml.safe_dump(workflow, sort_keys=False))
    assert run_workflow(str(path))["stages"] == {"latents": "ran", "stage1": "ran"}
    latents = tmp_path / "run" / "latents"
    shards = sorted(latents.glob("*.parquet"))
    damaged, kept = shards[-1], shards[:-1]
    original = damaged.read_bytes()
    damaged.unlink()
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in kept}
    rerun = run_workflow(str(path))
    assert rerun["stages"] == {"latents": "ran", "stage1": "ran"}
    assert damaged.read_bytes() == original
    assert {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in kept} == before
    assert run_workflow(str(path))["stages"] == {"latents": "skipped", "stage1": "skipped"}
