"""`infgen run WORKFLOW.yaml`: the stages of a workflow file in order, locally or as Ray jobs on a cluster.

Each finished stage leaves a record, RUN_DIR/workflow/<stage>.json, holding the hash of its command line
(its config) and of its inputs (the outputs of the stages it reads), and the hash of its own output. A rerun
skips every stage whose record still matches all three, and reruns the others: the stage commands resume
from what they wrote before (finished shards, checkpoints, scored chunks), so a failed workflow picks up where
it stopped. MLflow: one parent run per workflow (found again on rerun), one nested run per stage in the same
experiment, each stage's input datasets logged as run inputs, and the final decoder on the parent run.

Locally the stages run in this process on one embedded Ray; with --address (or RAY_ADDRESS) each stage is
submitted as a Ray job (jobs/ray_jobs.py) and its logs stream here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

from jobs.workflow_spec import (
    StageSpec,
    WorkflowSpec,
    load_workflow,
    output_arguments,
    stage_arguments,
    stage_output,
)
from pipelines.errors import StageError

RECORD_VERSION = 1
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def output_file(stage: StageSpec, output: str) -> str:
    """The file whose hash identifies a stage's finished output."""
    if stage.command == "train":
        return f"{output}/final_decoder/model.safetensors"
    return f"{output}/manifest.json"


def output_hash(stage: StageSpec, output: str) -> str | None:
    """sha256 of the stage's identifying output file, None when the stage has not finished."""
    import fsspec

    path = output_file(stage, output)
    filesystem, local = fsspec.core.url_to_fs(path)
    if not filesystem.exists(local):
        return None
    if stage.command != "train" and json.loads(filesystem.cat_file(local)).get("status") != "complete":
        return None
    digest = hashlib.sha256()
    with filesystem.open(local, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_hash(values) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


class Workflow:
    def __init__(self, spec: WorkflowSpec, address: str | None = None):
        from pipelines.tracking import absolute

        self.spec, self.address = spec, address
        self.run_dir = absolute(spec.run_dir)
        self.tracking_uri = spec.tracking_uri or f"sqlite:///{Path(self.run_dir) / 'mlflow.db'}"
        self.records = f"{self.run_dir}/workflow"

    # --- records -------------------------------------------------------------------------------------
    def record_path(self, stage: StageSpec) -> str:
        return f"{self.records}/{stage.name}.json"

    def read_record(self, stage: StageSpec) -> dict | None:
        import fsspec

        filesystem, local = fsspec.core.url_to_fs(self.record_path(stage))
        return json.loads(filesystem.cat_file(local)) if filesystem.exists(local) else None

    def write_record(self, stage: StageSpec, record: dict) -> None:
        from pipelines.ingest.manifest import write_json

        write_json(self.record_path(stage), record)

    def wanted(self, stage: StageSpec) -> dict:
        """What a finished stage's record must say for the stage to be skipped."""
        arguments = stage_arguments(self.spec, stage, self.run_dir)
        inputs = {}
        for upstream in stage.upstream():
            spec = next(s for s in self.spec.stages if s.name == upstream)
            inputs[upstream] = output_hash(spec, stage_output(self.run_dir, spec))
        config_hash = text_hash(output_arguments(stage, arguments))
        return {"arguments": arguments, "config_hash": config_hash, "inputs": inputs}

    def up_to_date(self, stage: StageSpec, wanted: dict) -> bool:
        record = self.read_record(stage)
        if not record or record.get("status") != "complete":
            return False
        current = output_hash(stage, stage_output(self.run_dir, stage))
        return (self.recorded_config_hash(stage, record), record["inputs"], record["output_hash"]) == (
            wanted["config_hash"], wanted["inputs"], current,
        )  # fmt: skip

    @staticmethod
    def recorded_config_hash(stage: StageSpec, record: dict) -> str:
        """Recomputed from the recorded command line (every record has it), so that records from before an
        option counted as a resource setting (and so dropped from the hash) still match."""
        return text_hash(output_arguments(stage, record["arguments"]))

    # --- MLflow --------------------------------------------------------------------------------------
    def parent_run(self) -> str:
        """The workflow's MLflow run: created once, found again by its tag on every rerun."""
        from mlflow import MlflowClient

        from pipelines.tracking import local_artifact_location

        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.spec.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(self.spec.experiment, local_artifact_location(self.tracking_uri))
        )
        tag = f"{self.spec.name}@{self.run_dir}"
        found = client.search_runs([experiment_id], f"tags.`infgen.workflow` = '{tag}'", max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = client.create_run(
            experiment_id,
            run_name=self.spec.name,
            tags={"infgen.workflow": tag, "infgen.workflow_file": self.spec.source},
        )
        client.log_param(run.info.run_id, "run_dir", self.run_dir)
        client.log_param(run.info.run_id, "stages", ",".join(self.spec.stage_names()))
        client.log_text(run.info.run_id, Path(self.spec.source).read_text(), "workflow.yaml")
        return run.info.run_id

    def stage_run(self, stage: StageSpec, parent: str) -> str | None:
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.spec.experiment)
        query = f"tags.`mlflow.parentRunId` = '{parent}' and tags.`mlflow.runName` = '{stage.name}'"
        found = client.search_runs([experiment.experiment_id], query, max_results=1,
                                   order_by=["attributes.start_time DESC"])  # fmt: skip
        return found[0].info.run_id if found else None

    def log_inputs(self, stage: StageSpec, run_id: str, inputs: dict) -> None:
        """The stages this one read, as MLflow dataset inputs of its run (name, where, digest)."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=run_id):
            for option, value in stage.options.items():
                for upstream in stage.upstream():
                    if f"{{{upstream}}}" not in str(value) or inputs.get(upstream) is None:
                        continue
                    location = str(value).replace(
                        f"{{{upstream}}}", stage_output(self.run_dir, self._stage(upstream))
                    )
                    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
                        warnings.simplefilter("ignore")
                        source = resolve_dataset_source(location)
                    dataset = MetaDataset(source, name=f"{upstream}:{option}", digest=inputs[upstream][:16])
                    mlflow.log_input(dataset, context=option)

    def _stage(self, name: str) -> StageSpec:
        return next(s for s in self.spec.stages if s.name == name)

    def supersede_if_changed(self, stage: StageSpec, wanted: dict, parent: str, heading: str) -> None:
        """A stage that ran before with another config or other inputs cannot resume into its old output (the
        stages refuse to mix runs): move that output to RUN_DIR/superseded/, nothing deleted, and rename its
        MLflow run so the rerun starts a fresh one. A stage that failed with the same config resumes."""
        import fsspec

        previous = self.read_record(stage)
        if not previous or (self.recorded_config_hash(stage, previous), previous.get("inputs")) == (
            wanted["config_hash"], wanted["inputs"],
        ):  # fmt: skip
            return
        filesystem, local = fsspec.core.url_to_fs(stage_output(self.run_dir, stage))
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        if filesystem.exists(local):
            target = f"{self.run_dir}/superseded/{stage.name}-{stamp}"
            target_local = fsspec.core.url_to_fs(target)[1]
            filesystem.makedirs(target_local.rsplit("/", 1)[0], exist_ok=True)
            filesystem.mv(local, target_local, recursive=True)
            print(f"{heading}: config or inputs changed since it last ran; previous output moved to {target}")
        run_id = previous.get("mlflow_run_id") or self.stage_run(stage, parent)
        if run_id:
            from mlflow import MlflowClient

            client = MlflowClient(self.tracking_uri)
            client.set_tag(run_id, "mlflow.runName", f"{stage.name} (superseded {stamp})")
            client.set_tag(run_id, "infgen.run_name", f"{stage.name}@superseded-{stamp}")
            client.set_tag(run_id, "infgen.superseded", "true")

    # --- running -------------------------------------------------------------------------------------
    def tracking_arguments(self, stage: StageSpec, parent: str) -> list[str]:
        arguments = ["--tracking-uri", self.tracking_uri, "--parent-run-id", parent,
                     "--experiment", self.spec.experiment]  # fmt: skip
        if stage.command != "train":  # a training run is named by its --name already
            arguments += ["--run-name", stage.name]
        return arguments

    def execute(self, stage: StageSpec, arguments: list[str]) -> None:
        if self.address:
            from jobs.ray_jobs import submit_stage

            submit_stage(
                self.address,
                arguments,
                working_dir=str(PROJECT_ROOT),
                env_vars={"MLFLOW_TRACKING_URI": self.tracking_uri},
                submission_id=f"infgen-{self.spec.name}-{stage.name}-{int(time.time())}",
            )
            return
        from jobs.cli import build_parser, run_command

        run_command(build_parser().parse_args(arguments))

    def run(self, first: str | None = None, last: str | None = None) -> dict:
        from mlflow import MlflowClient

        selected = self.spec.select(first, last)
        for stage in selected:  # a stage after --from needs its upstream finished already
            for upstream in stage.upstream():
                if (
                    upstream not in [s.name for s in selected]
                    and output_hash(self._stage(upstream), stage_output(self.run_dir, self._stage(upstream)))
                    is None
                ):
                    raise ValueError(f"stage {stage.name} reads {upstream}, which has not finished; "
                                     f"run from {upstream} (--from {upstream})")  # fmt: skip
        if "://" not in self.run_dir:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        parent = self.parent_run()
        client = MlflowClient(self.tracking_uri)
        where = f"Ray jobs on {self.address}" if self.address else "this machine (embedded Ray)"
        print(f"workflow {self.spec.name}: {len(selected)} stage(s) on {where}; MLflow run {parent}")
        summary = {"parent_run_id": parent, "stages": {}}
        started = time.perf_counter()
        try:
            for index, stage in enumerate(selected, start=1):
                wanted = self.wanted(stage)
                heading = f"workflow {self.spec.name}: [{index}/{len(selected)}] {stage.name}"
                if self.up_to_date(stage, wanted):
                    print(f"{heading}: up to date, skipped")
                    summary["stages"][stage.name] = "skipped"
                    continue
                missing = [name for name, digest in wanted["inputs"].items() if digest is None]
                if missing:
                    raise StageError(f"stage {stage.name}: input stage(s) {missing} have no finished output")
                self.supersede_if_changed(stage, wanted, parent, heading)
                print(f"{heading}: infgen {' '.join(wanted['arguments'])}")
                stage_started = time.perf_counter()
                record = {
                    "record_version": RECORD_VERSION,
                    "stage": stage.name,
                    **wanted,
                    "status": "running",
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                self.write_record(stage, record)
                try:
                    self.execute(stage, wanted["arguments"] + self.tracking_arguments(stage, parent))
                except BaseException as error:
                    self.write_record(
                        stage, {**record, "status": "failed", "error": f"{type(error).__name__}: {error}"}
                    )
                    raise
                output = stage_output(self.run_dir, stage)
                digest = output_hash(stage, output)
                if digest is None:
                    self.write_record(stage, {**record, "status": "failed", "error": "no finished output"})
                    raise StageError(f"stage {stage.name} ended without a finished output at {output}")
                run_id = self.stage_run(stage, parent)
                if run_id:
                    self.log_inputs(stage, run_id, wanted["inputs"])
                seconds = round(time.perf_counter() - stage_started, 1)
                self.write_record(
                    stage,
                    {
                        **record,
                        "status": "complete",
                        "output": output,
                        "output_hash": digest,
                        "mlflow_run_id": run_id,
                        "seconds": seconds,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                )
                client.log_metric(parent, f"seconds.{stage.name}", seconds)
                summary["stages"][stage.name] = "ran"
                print(f"{heading}: done in {seconds:.0f}s")
        except BaseException:
            client.set_terminated(parent, status="FAILED")
            raise
        self.finish(parent, client)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        return summary

    def finish(self, parent: str, client) -> None:
        """The last trained decoder and the last evaluation's table on the parent run, then where to look."""
        for stage in reversed(self.spec.stages):
            output = stage_output(self.run_dir, stage)
            if stage.command == "train" and os.path.isdir(f"{output}/final_decoder"):
                client.log_artifacts(parent, f"{output}/final_decoder", "decoder")
                client.set_tag(parent, "infgen.decoder", f"{output}/final_decoder")
                break
        for stage in reversed(self.spec.stages):
            output = stage_output(self.run_dir, stage)
            if stage.command == "evaluate" and os.path.isfile(f"{output}/plugin_gains.md"):
                client.log_artifact(parent, f"{output}/plugin_gains.md")
                print(Path(f"{output}/plugin_gains.md").read_text())
                break
        client.set_terminated(parent, status="FINISHED")
        database = self.tracking_uri.removeprefix("sqlite:///")
        print(f"workflow {self.spec.name}: finished. Results under {self.run_dir}")
        if self.tracking_uri.startswith("sqlite:///"):
            print(f"  see them in MLflow:  mlflow ui --backend-store-uri sqlite:///{database}")
        else:
            print(f"  see them in MLflow at {self.tracking_uri} (parent run {parent})")


def run_workflow(path: str, first: str | None = None, last: str | None = None, address: str | None = None):
    spec = load_workflow(path)
    address = address or os.environ.get("RAY_ADDRESS") or None
    return Workflow(spec, address).run(first, last)
