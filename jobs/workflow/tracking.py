"""The workflow in MLflow: one parent run per workflow (found again by its tag on every rerun), one nested run
per stage in the same experiment, each stage's inputs logged as MLflow datasets, and at the end what the
stages publish in their manifests (`published`: the trained decoder, the evaluation's table) on the parent.

A stage's run is opened (RUNNING) before the stage starts, here or as a Ray job, so its id is in the stage's
record from the start; the stage's command finds it by its tags and ends it (pipelines/common/tracking.py). A
stage that dies without ending it (a killed job) has it ended here. The decoder is uploaded once, by the
training stage, to its own run: the parent references it (the `infgen.decoder_artifact` tag, a runs:/ URI)."""

from __future__ import annotations

import warnings
from pathlib import Path

from jobs.workflow.spec import StageSpec, WorkflowSpec
from pipelines.common.files import exists, read_json
from pipelines.common.tracking import (
    ERROR_TAG,
    ERROR_TAG_LIMIT,
    StageTracking,
    experiment_id,
    find_or_create_run,
    find_run,
    open_stage_run,
)


class WorkflowTracking:
    def __init__(self, spec: WorkflowSpec, run_dir: str, tracking_uri: str):
        from mlflow import MlflowClient

        self.spec, self.run_dir, self.uri = spec, run_dir, tracking_uri
        self.client = MlflowClient(tracking_uri)

    def experiment(self) -> str:
        return experiment_id(self.client, self.spec.experiment, self.uri)

    def parent_run(self) -> str:
        """The workflow's MLflow run: created once, found again by its tag on every rerun (marked running)."""
        tag = f"{self.spec.name}@{self.run_dir}"

        def describe(run_id: str) -> None:
            self.client.log_param(run_id, "run_dir", self.run_dir)
            self.client.log_param(run_id, "stages", ",".join(self.spec.stage_names()))
            self.client.log_text(run_id, self.spec.text, "workflow.yaml")

        run_id = find_or_create_run(self.client, self.experiment(), {"infgen.workflow": tag}, self.spec.name,
                                    on_create=describe)  # fmt: skip
        self.client.set_tag(run_id, "infgen.workflow_file", self.spec.source)
        self.client.update_run(run_id, status="RUNNING")
        if ERROR_TAG in self.client.get_run(run_id).data.tags:  # the error of an earlier try
            self.client.delete_tag(run_id, ERROR_TAG)
        return run_id

    def open_stage_run(self, stage: StageSpec, parent: str, output: str) -> str:
        from jobs.registry import COMMANDS

        tracking = StageTracking(self.uri, self.spec.experiment, stage.name, parent)
        return open_stage_run(tracking, COMMANDS[stage.command].experiment, stage.name, output)

    def end_stage_run(self, run_id: str, status: str, error: str) -> None:
        """End a stage's run that its stage left RUNNING (a job killed before it could)."""
        run = self.client.get_run(run_id)
        if run.info.status != "RUNNING":
            return
        if ERROR_TAG not in run.data.tags:
            self.client.set_tag(run_id, ERROR_TAG, error[-ERROR_TAG_LIMIT:])
        self.client.set_terminated(run_id, status=status)

    def stage_run(self, stage: StageSpec, parent: str) -> str | None:
        found = find_run(self.client, self.experiment(),
                         {"mlflow.parentRunId": parent, "mlflow.runName": stage.name})  # fmt: skip
        return found.info.run_id if found else None

    def log_inputs(self, stage: StageSpec, run_id: str, inputs: dict, outputs: dict[str, str]) -> None:
        """The stages this one read, as MLflow dataset inputs of its run (name, where, digest)."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=run_id):
            for option, value in stage.options.items():
                for upstream in stage.upstream():
                    if f"{{{upstream}}}" not in str(value) or inputs.get(upstream) is None:
                        continue
                    location = str(value).replace(f"{{{upstream}}}", outputs[upstream])
                    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
                        warnings.simplefilter("ignore")
                        source = resolve_dataset_source(location)
                    dataset = MetaDataset(source, name=f"{upstream}:{option}", digest=inputs[upstream][:16])
                    mlflow.log_input(dataset, context=option)

    def mark_superseded(self, run_id: str, stage: StageSpec, stamp: str) -> None:
        """Renamed and tagged, so the stage's rerun starts a fresh run beside it."""
        self.client.set_tag(run_id, "mlflow.runName", f"{stage.name} (superseded {stamp})")
        self.client.set_tag(run_id, "infgen.run_name", f"{stage.name}@superseded-{stamp}")
        self.client.set_tag(run_id, "infgen.superseded", "true")

    def stage_seconds(self, parent: str, stage: StageSpec, seconds: float) -> None:
        self.client.log_metric(parent, f"seconds.{stage.name}", seconds)

    def publish(self, parent: str, outputs: dict[str, str], run_ids: dict[str, str | None]) -> str | None:
        """The last stage's published decoder (referenced: the stage's run holds it) and table on the parent
        run; returns the table's text."""
        decoder = table = None
        for name in reversed(self.spec.stage_names()):
            manifest_path = f"{outputs[name]}/manifest.json"
            if not exists(manifest_path):
                continue
            published = read_json(manifest_path, "manifest").get("published") or {}
            if decoder is None and "decoder" in published:
                decoder = (f"{outputs[name]}/{published['decoder']}", run_ids.get(name))
            if table is None and "table" in published:
                table = f"{outputs[name]}/{published['table']}"
        if decoder:
            folder, run_id = decoder
            self.client.set_tag(parent, "infgen.decoder", folder)
            if run_id:  # training logged it as its run's "decoder" artifact
                self.client.set_tag(parent, "infgen.decoder_artifact", f"runs:/{run_id}/decoder")
        text = None
        if table and Path(table).is_file():
            self.client.log_artifact(parent, table)
            text = Path(table).read_text()
        return text

    def finished(self, parent: str, status: str, error: str | None = None) -> None:
        if error:
            self.client.set_tag(parent, ERROR_TAG, error[-ERROR_TAG_LIMIT:])
        self.client.set_terminated(parent, status=status)
