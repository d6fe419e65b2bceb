"""`infgen run WORKFLOW.yaml`: the workflow files we ship load and validate; bad files fail naming the stage
and option; the demo workflow, reduced, runs all five stages on the session's Ray (real img2dataset over
127.0.0.1, Ray Train + DeepSpeed, the evaluation actors, MLflow on SQLite), a failed stage is recorded and a
rerun runs only it, and a finished workflow reruns as all skipped. The Ray-job path is in test_ray_jobs.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs.workflow import Workflow, run_workflow
from jobs.workflow.spec import load_workflow, stage_arguments

REPOSITORY = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "latents", "stage1", "stage2", "photos", "evaluate"]


def write_workflow(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def demo_data() -> dict:
    return yaml.safe_load((REPOSITORY / "jobs" / "demo.yaml").read_text())


# --- the files we ship, and bad files ------------------------------------------------------------------
def test_the_full_scale_workflow_loads_with_the_papers_settings():
    spec = load_workflow(REPOSITORY / "jobs" / "laion_5m.yaml")
    assert spec.stage_names() == ["ingest", "latents", "latents-stage2", "stage1", "stage2", "evaluate"]
    commands = {stage.name: stage_arguments(spec, stage, spec.run_dir) for stage in spec.stages}
    run_dir = "/mnt/infgen/workflows/laion-5m-v1"
    assert commands["ingest"][:1] == ["ingest"] and "5000000" in commands["ingest"]
    stage2 = commands["stage2"]
    assert stage2[stage2.index("--continue-from") + 1] == f"{run_dir}/stage1"
    assert stage2[stage2.index("--latents") + 1] == f"{run_dir}/latents-stage2"
    evaluate = commands["evaluate"]
    sizes = evaluate.index("--sizes")
    assert evaluate[sizes + 1 : sizes + 5] == ["512", "1024", "2048", "3072"]
    assert evaluate.count("--latent-file") == 3  # an append option: the flag once per file
    assert evaluate[-2:] == ["--output", f"{run_dir}/evaluate"]


def test_the_demo_workflow_loads():
    spec = load_workflow(REPOSITORY / "jobs" / "demo.yaml")
    assert spec.stage_names() == STAGES


def set_option(stage: int, **options):
    return lambda data: data["stages"][stage]["options"].update(options)


BAD_FILES = {
    "typo": (set_option(2, stepz=3), r"stage stage1: unknown option 'stepz' for `infgen train`"),
    # argparse takes abbreviations; the workflow's records would then miss what the option is
    "abbreviated": (set_option(1, **{"encoder-mem": 2}), r"stage latents: unknown option 'encoder-mem'"),
    "bad choice": (set_option(1, preset="huge"), r"stage latents: .*invalid choice: 'huge'"),
    "unknown stage": (set_option(3, latents="{stage9}"), r"\(stage2\): \{stage9\} is not an earlier"),
    "reserved": (set_option(0, output="/elsewhere"), r"\(ingest\): option 'output' is set by"),
    "command": (lambda d: d["stages"][5].update(command="deploy"), r"\(evaluate\): command 'deploy' is not"),
    "repeated": (lambda d: d["stages"].append(dict(d["stages"][0])), r"stage 7: name 'ingest' must be a new"),
    "missing key": (lambda d: d.pop("run_dir"), r"'run_dir' is missing"),
    # Ranges and rules across options (and the preset) are the stage config's own, checked at load too.
    "negative steps": (set_option(2, steps=-5), r"stage stage1: steps must be ≥ 1, got -5"),
    "GAN past the end": (
        set_option(2, steps=10, **{"gan-start-step": 10}),
        r"stage stage1: loss.gan_start_step \(10\) must be below steps \(10\)",
    ),
    "fraction out of range": (
        set_option(1, **{"holdout-fraction": 1.5}),
        r"stage latents: holdout_fraction must be in \[0, 1\)",
    ),
    "unknown key": (lambda d: d.update(stagse=[]), r"unknown keys \['stagse'\]"),
}


@pytest.mark.parametrize("change, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_workflow_file_fails_on_load_naming_the_stage(tmp_path, change, message):
    data = demo_data()
    change(data)
    path = write_workflow(tmp_path / "bad.yaml", data)
    with pytest.raises(ValueError, match=message) as error:
        load_workflow(path)
    assert str(path) in str(error.value)


def test_from_and_until_must_name_stages_in_order():
    spec = load_workflow(REPOSITORY / "jobs" / "demo.yaml")
    assert [s.name for s in spec.select("latents", "stage2")] == ["latents", "stage1", "stage2"]
    with pytest.raises(ValueError, match="--from stage3: no such stage .*stages: ingest, latents"):
        spec.select("stage3", None)
    with pytest.raises(ValueError, match="--from evaluate comes after --until latents"):
        spec.select("evaluate", "latents")


def test_a_stage_whose_input_never_finished_is_refused_before_anything_runs(tmp_path):
    data = {**demo_data(), "run_dir": str(tmp_path / "run")}
    path = write_workflow(tmp_path / "demo.yaml", data)
    with pytest.raises(ValueError, match="stage latents reads ingest, which has not finished"):
        run_workflow(str(path), first="latents")
    assert not (tmp_path / "run").exists()


# --- the demo workflow, reduced -------------------------------------------------------------------------
def reduced_demo(run_dir: Path, bad_latents: Path) -> dict:
    """jobs/demo.yaml with fewer images and steps, one training worker, one evaluation size, and an extra
    latent file for the evaluation (which the failure test breaks and mends)."""
    data = demo_data()
    data["run_dir"] = str(run_dir)
    options = {stage["name"]: stage["options"] for stage in data["stages"]}
    options["ingest"].update(embedded=48)
    options["latents"].update({"holdout-fraction": 0.4})
    options["stage1"].update(steps=4, workers=1)
    options["stage2"].update(steps=2, workers=1)
    options["evaluate"].update({"sizes": [64], "max-images": 8, "latent-file": [f"dit={bad_latents}"]})
    return data


def mlflow_client(run_dir: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")


@pytest.fixture(scope="module")
def demo_run(ray_address, tmp_path_factory):
    """Run 1 fails at the evaluation (a latent file with 3 channels); the file is mended and run 2 goes on."""
    root = tmp_path_factory.mktemp("workflow")
    latent_file = root / "dit.npy"
    np.save(latent_file, np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32))
    path = write_workflow(root / "demo.yaml", reduced_demo(root / "run", latent_file))
    with pytest.raises(ValueError, match="3 channels") as failure:
        run_workflow(str(path))
    records_after_failure = {
        name: json.loads((root / "run" / "workflow" / f"{name}.json").read_text()) for name in STAGES
    }
    client = mlflow_client(root / "run")
    experiment = client.get_experiment_by_name("infgen-demo").experiment_id
    parent_after_failure = client.search_runs([experiment], "tags.`infgen.workflow` != ''")[0]
    evaluate_output_after_failure = (root / "run" / "evaluate").exists()
    np.save(latent_file, np.random.default_rng(0).standard_normal((5, 4, 8, 8)).astype(np.float32))
    resumed = run_workflow(str(path))
    return {"root": root, "path": path, "run_dir": root / "run", "failure": str(failure.value),
            "records_after_failure": records_after_failure, "resumed": resumed,
            "parent_status_after_failure": parent_after_failure.info.status,
            "evaluate_output_after_failure": evaluate_output_after_failure}  # fmt: skip


def test_a_failed_stage_is_recorded_and_the_rerun_runs_only_it(demo_run):
    records = demo_run["records_after_failure"]
    assert [records[name]["status"] for name in STAGES] == ["complete"] * 5 + ["failed"]
    assert "dit.npy" in records["evaluate"]["error"] and "3 channels" in records["evaluate"]["error"]
    assert demo_run["parent_status_after_failure"] == "FAILED"
    assert not demo_run["evaluate_output_after_failure"]  # refused before anything was written
    assert demo_run["resumed"]["stages"] == {**{name: "skipped" for name in STAGES[:5]}, "evaluate": "ran"}


def test_every_stage_leaves_a_record_of_its_config_inputs_and_output(demo_run):
    run_dir = demo_run["run_dir"]
    records = {name: json.loads((run_dir / "workflow" / f"{name}.json").read_text()) for name in STAGES}
    assert all(record["status"] == "complete" for record in records.values())
    assert all(len(record["output_hash"]) == 64 for record in records.values())
    assert records["latents"]["inputs"] == {"ingest": records["ingest"]["output_hash"]}
    assert records["stage2"]["inputs"] == {"stage1": records["stage1"]["output_hash"],
                                           "latents": records["latents"]["output_hash"],
                                           "ingest": records["ingest"]["output_hash"]}  # fmt: skip
    assert "--steps" in records["stage2"]["arguments"]
    manifest = json.loads((run_dir / "evaluate" / "manifest.json").read_text())
    assert {row["source"] for row in manifest["rows"]} == {"held-out", "photos", "dit"}
    assert records["evaluate"]["inputs"]["photos"] == records["photos"]["output_hash"]
    assert manifest["inputs"]["images_dir"]["path"] == str(run_dir / "photos")
    assert (run_dir / "evaluate" / "plugin_gains.md").read_text().count("| InfGen |") == 3


def test_mlflow_holds_one_parent_run_with_a_nested_run_per_stage(demo_run):
    client = mlflow_client(demo_run["run_dir"])
    experiment = client.get_experiment_by_name("infgen-demo")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`infgen.workflow` != ''")
    assert parent.info.status == "FINISHED"
    query = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    children = client.search_runs([experiment.experiment_id], query)
    # one each: the evaluation's failed try left its run FAILED, and the rerun resumed it
    assert sorted(run.info.run_name for run in children) == sorted(STAGES)
    assert {run.info.status for run in children} == {"FINISHED"}
    assert "infgen.error" not in next(run for run in children if run.info.run_name == "evaluate").data.tags
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"plugin_gains.md", "workflow.yaml"} <= parent_artifacts
    # the decoder is uploaded once, by training, and referenced from the parent
    assert "decoder" not in parent_artifacts
    stage2 = next(run for run in children if run.info.run_name == "stage2")
    assert parent.data.tags["infgen.decoder_artifact"] == f"runs:/{stage2.info.run_id}/decoder"
    assert {a.path for a in client.list_artifacts(stage2.info.run_id, "decoder")} >= {
        "decoder/model.safetensors", "decoder/config.json"}  # fmt: skip
    latents = next(run for run in children if run.info.run_name == "latents")
    inputs = latents.inputs.dataset_inputs
    assert [item.dataset.name for item in inputs] == ["ingest:images"]
    assert inputs[0].dataset.digest == demo_run["records_after_failure"]["ingest"]["output_hash"][:16]
    assert {"seconds.ingest", "seconds.evaluate"} <= set(parent.data.metrics)


def test_a_finished_workflow_reruns_as_all_skipped_and_a_changed_option_reruns_that_stage(demo_run, capsys):
    capsys.readouterr()
    rerun = run_workflow(str(demo_run["path"]))
    assert rerun["stages"] == {name: "skipped" for name in STAGES}
    assert capsys.readouterr().out.count("| source | size | decoder |") == 1  # the table, once, at the end
    run_dir = demo_run["run_dir"]
    first_table = json.loads((run_dir / "evaluate" / "manifest.json").read_text())

    data = yaml.safe_load(demo_run["path"].read_text())
    data["stages"][1]["options"].update({"encoders": 1, "encoder-memory-gib": 0.5})  # how a stage runs,
    data["stages"][5]["options"]["workers"] = 2  # not what it makes: nothing reruns, nothing superseded
    resources = write_workflow(demo_run["root"] / "resources.yaml", data)
    assert run_workflow(str(resources))["stages"] == {name: "skipped" for name in STAGES}
    assert not (run_dir / "superseded").exists()

    data["stages"][5]["options"]["patches-per-image"] = 3  # the evaluation's config changes
    changed = write_workflow(demo_run["root"] / "changed.yaml", data)
    rerun = run_workflow(str(changed))
    assert rerun["stages"] == {**{name: "skipped" for name in STAGES[:5]}, "evaluate": "ran"}
    new_table = json.loads((run_dir / "evaluate" / "manifest.json").read_text())
    assert new_table["config"]["patches_per_image"] == 3
    (moved,) = (run_dir / "superseded").iterdir()  # the old evaluation, kept whole
    assert moved.name.startswith("evaluate-")
    assert json.loads((moved / "manifest.json").read_text()) == first_table
    client = mlflow_client(run_dir)
    experiment = client.get_experiment_by_name("infgen-demo").experiment_id
    evaluations = client.search_runs([experiment], "tags.`mlflow.runName` LIKE 'evaluate%'")
    assert sorted(run.data.tags.get("infgen.superseded", "no") for run in evaluations) == ["no", "true"]

    # An output changed behind the workflow's back no longer matches its record: it and the next rerun.
    spec = load_workflow(changed)
    workflow = Workflow(spec)
    (run_dir / "stage1" / "final_decoder" / "model.safetensors").write_bytes(b"changed")
    # A stored hash is not trusted: it is recomputed from the recorded command line (older versions hashed
    # resource options too), so this record still matches.
    record_path = run_dir / "workflow" / "latents.json"
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "config_hash": "older"}))
    up_to_date = [workflow.up_to_date(stage, workflow.wanted(stage)) for stage in spec.stages]
    assert up_to_date == [True, True, False, False, True, True]
