"""A workflow run as its records tell it (RUN_DIR/workflow/: _run.json and one record per stage), with the Ray
jobs' live states and the stage runs' MLflow progress where asked: what `infgen status`, `infgen logs` and
`infgen stop` read. The records alone need neither Ray nor MLflow.

Where the run directory is not readable here (a volume only the cluster's nodes mount, such as
jobs/laion_5m.yaml's /mnt/infgen), `locate_state` reads it on the cluster: a small Ray job runs this module
(`python -m jobs.workflow.state RUN_DIR`), which prints the state as one JSON line. Before the orchestrator
has written anything, the run is known by its orchestrator job's metadata alone.
"""

from __future__ import annotations

import io
import json
import shlex
import sys
from dataclasses import asdict, dataclass, field

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


# The line `python -m jobs.workflow.state` prints; everything else in the job's log is Ray's.
STATE_LINE = "infgen-run-state: "


def locate_state(run_dir: str, address: str | None) -> RunState:
    """The run's state read here when its run directory is readable here; else, given a cluster `address`,
    read on the cluster; else (the orchestrator has not written yet) what its orchestrator job says."""
    try:
        return load_state(run_dir)
    except FileNotFoundError:
        if not address or "://" in run_dir:
            raise
    from jobs.ray_jobs import connect

    try:
        return load_state_on_cluster(address, run_dir)
    except FileNotFoundError as missing:
        job = orchestrator_job(connect(address), absolute(run_dir).rstrip("/"))
        if job is None:
            raise FileNotFoundError(f"{missing}; and no orchestrator job on {address} writes there") from None
    orchestrator = {"submission_id": job.submission_id, "address": address}
    run = {"workflow": job.metadata.get("infgen_workflow"), "status": "submitted",
           "orchestrator": orchestrator}  # fmt: skip
    return RunState(absolute(run_dir).rstrip("/"), run, {})


def load_state_on_cluster(address: str, run_dir: str) -> RunState:
    """load_state run as a Ray job on the cluster at `address` (whose nodes mount the run directory)."""
    from jobs.ray_jobs import JobFailed, submit_command
    from jobs.workflow.execution import PROJECT_ROOT

    log = io.StringIO()
    entrypoint = shlex.join(["python", "-m", "jobs.workflow.state", run_dir])
    try:
        submit_command(address, entrypoint, working_dir=str(PROJECT_ROOT), output=log, log_tail_lines=3,
                       metadata={"infgen_role": "status", "infgen_run_dir": run_dir})  # fmt: skip
    except JobFailed as failed:
        raise FileNotFoundError(
            f"{run_dir} is not readable here, nor on the cluster at {address}: {failed.log_tail.strip()}"
        ) from None
    for line in log.getvalue().splitlines():
        if line.startswith(STATE_LINE):
            return RunState(**json.loads(line.removeprefix(STATE_LINE)))
    raise RuntimeError(f"the job that read {run_dir} on {address} printed no state; its log:\n"
                       f"{log.getvalue()}")  # fmt: skip


def orchestrator_job(client, run_dir: str | None = None, workflow: str | None = None):
    """The newest orchestrator job on this cluster that writes `run_dir` (or runs the workflow called
    `workflow`), as Ray's JobDetails, or None."""
    wanted = {"infgen_role": "orchestrator", "infgen_run_dir": run_dir, "infgen_workflow": workflow}
    wanted = {key: value for key, value in wanted.items() if value is not None}
    jobs = [job for job in client.list_jobs()
            if all((job.metadata or {}).get(key) == value for key, value in wanted.items())]  # fmt: skip
    return max(jobs, key=lambda job: job.start_time or 0) if jobs else None


def run_dir_of_workflow(client, name: str) -> str | None:
    """The run directory of the newest orchestrator job of the workflow called `name` on this cluster."""
    job = orchestrator_job(client, workflow=name)
    return job.metadata.get("infgen_run_dir") if job else None


def stage_progress(tracking_uri: str, run_id: str) -> tuple[str, dict[str, float]]:
    """The stage run's MLflow status and its latest progress metrics (training: its step)."""
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri).get_run(run_id)
    metrics = {name.removeprefix("progress."): value for name, value in run.data.metrics.items()
               if name.startswith("progress.")}  # fmt: skip
    return run.info.status, metrics


if __name__ == "__main__":  # run on the cluster by load_state_on_cluster
    try:
        state = load_state(sys.argv[1])
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    print(STATE_LINE + json.dumps(asdict(state)))
