"""`infgen photos`: the held-out photographs scikit-image ships, written as PNG files with a manifest that
vouches for their bytes; a rerun into the same folder is accepted, another claim on it refused."""

import json

import numpy as np
import pytest
from PIL import Image

from infgen.substitutes.photographs import HELD_OUT, load_photograph
from jobs.cli import run_arguments
from jobs.workflow.records import output_hash
from pipelines.common.files import file_sha256


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    arguments = [
        "photos",
        "--output",
        str(root / "photos"),
        "--tracking-uri",
        f"sqlite:///{root / 'mlflow.db'}",
    ]
    return {
        "root": root,
        "output": root / "photos",
        "arguments": arguments,
        "manifest": run_arguments(arguments),
    }


def test_every_held_out_photograph_is_written_losslessly(photos):
    output, manifest = photos["output"], photos["manifest"]
    assert sorted(p.name for p in output.glob("*.png")) == sorted(f"{photo.name}.png" for photo in HELD_OUT)
    for photo in HELD_OUT:
        with Image.open(output / f"{photo.name}.png") as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), load_photograph(photo))
    assert manifest["status"] == "complete" and manifest["counts"] == {"photographs": len(HELD_OUT)}
    assert manifest["checksums"] == {
        f"{p.name}.png": file_sha256(str(output / f"{p.name}.png")) for p in HELD_OUT
    }
    assert json.loads((output / "manifest.json").read_text()) == manifest


def test_a_changed_photograph_no_longer_matches_the_manifest(photos, tmp_path):
    assert output_hash(str(photos["output"])) is not None
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in photos["output"].iterdir():
        if path.is_file():
            copy.joinpath(path.name).write_bytes(path.read_bytes())
    assert output_hash(str(copy)) is not None
    (copy / f"{HELD_OUT[0].name}.png").write_bytes(b"changed")
    assert output_hash(str(copy)) is None


def test_a_rerun_into_the_same_folder_is_accepted_and_logged(photos):
    again = run_arguments(photos["arguments"])
    assert again["checksums"] == photos["manifest"]["checksums"]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{photos['root'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("infgen-photos")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(client.search_runs([experiment.experiment_id])) == 2
