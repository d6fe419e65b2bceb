"""A workflow run as its records tell it (RUN_DIR/workflow/: _run.json and one record per stage), with the Ray
jobs' live states and the stage runs' MLflow progress where asked: what `infgen status`, `infgen logs` and
`infgen stop` read. The records alone need neither Ray nor MLflow."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import fsspec

from jobs.workflow.records import read_run_record
from pipelines.common.files import absolute

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class RunState:
    run_dir: str
    run: dict  # _run.json (empty for a run that never wrote one)
    stages: dict[str, dict | None] = field(default_factory=dict)  # name → its record, in workflow order

    def address(self, given: str | None) -> str | None:
        """Where to ask Ray: --address, else the dashboard the orchestrator was submitted to, else the one
        its stages went to (from inside a cluster, that one may not be reachable from here)."""
        orchestrator = self.run.get("orchestrator") or {}
        return given or orchestrator.get("address") or self.run.get("stage_address")

    def running_jobs(self) -> list[tuple[str, str]]:
        """(what, submission id) of the orchestrator's job and of every stage job its record says runs."""
        jobs = []
        orchestrator = (self.run.get("orchestrator") or {}).get("submission_id")
        if orchestrator and self.run.get("status") in ("submitted", "running"):
            jobs.append(("orchestrator", orchestrator))
        for name, record in self.stages.items():
            if record and record.get("status") == "running" and record.get("submission_id"):
                jobs.append((name, record["submission_id"]))
        return jobs


def load_state(run_dir: str) -> RunState:
    run_dir = absolute(run_dir).rstrip("/")
    folder = f"{run_dir}/workflow"
    filesystem, local = fsspec.core.url_to_fs(folder)
    if not filesystem.exists(local):
        raise FileNotFoundError(f"{run_dir} holds no workflow run (no {folder}): is it a workflow's run_dir?")
    run = read_run_record(run_dir) or {}
    records = {}
    for path in filesystem.glob(f"{local}/*.json"):
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        if not name.startswith("_"):
            records[name] = json.loads(filesystem.cat_file(path))
    order = run.get("stages") or sorted(records, key=lambda name: records[name].get("started", ""))
    return RunState(run_dir, run, {name: records.get(name) for name in order})


def run_dir_of_workflow(client, name: str) -> str | None:
    """The run directory of the newest orchestrator job of the workflow called `name` on this cluster."""
    jobs = [job for job in client.list_jobs() if (job.metadata or {}).get("infgen_workflow") == name
            and (job.metadata or {}).get("infgen_role") == "orchestrator"]  # fmt: skip
    if not jobs:
        return None
    newest = max(jobs, key=lambda job: job.start_time or 0)
    return newest.metadata.get("infgen_run_dir")


def stage_progress(tracking_uri: str, run_id: str) -> tuple[str, dict[str, float]]:
    """The stage run's MLflow status and its latest progress metrics (training: its step)."""
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri).get_run(run_id)
    metrics = {name.removeprefix("progress."): value for name, value in run.data.metrics.items()
               if name.startswith("progress.")}  # fmt: skip
    return run.info.status, metrics
