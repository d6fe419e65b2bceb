"""The workflow in MLflow: one parent run per workflow (found again by its tag on every rerun), one nested run
per stage in the same experiment, each stage's inputs logged as MLflow datasets, and at the end what the
stages publish in their manifests (`published`: the trained decoder, the evaluation's table) on the parent."""

from __future__ import annotations

import warnings
from pathlib import Path

from jobs.workflow.spec import StageSpec, WorkflowSpec
from pipelines.common.files import exists, read_json
from pipelines.common.tracking import experiment_id, find_or_create_run, find_run


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
            self.client.log_text(run_id, Path(self.spec.source).read_text(), "workflow.yaml")

        run_id = find_or_create_run(self.client, self.experiment(), {"infgen.workflow": tag}, self.spec.name,
                                    on_create=describe)  # fmt: skip
        self.client.set_tag(run_id, "infgen.workflow_file", self.spec.source)
        self.client.update_run(run_id, status="RUNNING")
        return run_id

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

    def publish(self, parent: str, outputs: dict[str, str]) -> str | None:
        """The last stage's published decoder and table on the parent run; returns the table's text."""
        decoder = table = None
        for name in reversed(self.spec.stage_names()):
            manifest_path = f"{outputs[name]}/manifest.json"
            if not exists(manifest_path):
                continue
            published = read_json(manifest_path, "manifest").get("published") or {}
            if decoder is None and "decoder" in published:
                decoder = f"{outputs[name]}/{published['decoder']}"
            if table is None and "table" in published:
                table = f"{outputs[name]}/{published['table']}"
        if decoder and Path(decoder).is_dir():
            self.client.log_artifacts(parent, decoder, "decoder")
            self.client.set_tag(parent, "infgen.decoder", decoder)
        text = None
        if table and Path(table).is_file():
            self.client.log_artifact(parent, table)
            text = Path(table).read_text()
        return text

    def finished(self, parent: str, ok: bool) -> None:
        self.client.set_terminated(parent, status="FINISHED" if ok else "FAILED")
