"""`infgen run WORKFLOW.yaml`: the stages of a workflow file in order, locally or as Ray jobs on a cluster.

Each finished stage leaves a record (jobs/workflow/records.py). A rerun skips every stage whose record still
matches its config, its inputs and its output, and reruns the others: the stage commands resume from what they
wrote before (finished shards, checkpoints, scored chunks), so a failed workflow picks up where it stopped. A
stage whose config or inputs changed cannot resume into its old output (the stages refuse to mix runs): that
output moves to RUN_DIR/superseded/ (nothing deleted) and the stage runs fresh. MLflow:
jobs/workflow/tracking.py.

Locally the stages run in this process on one embedded Ray; with --address (or RAY_API_SERVER_ADDRESS /
RAY_ADDRESS) each stage is submitted as a Ray job to that cluster's dashboard and its log streams here.

The orchestrator on the cluster: `infgen run` can itself be a Ray job (`ray job submit -- python -m jobs.cli
run ...`, a KubeRay RayJob, or `infgen run ... --detach`, jobs/workflow/detached.py). Inside a job Ray sets
RAY_ADDRESS to its cluster's GCS, which jobs/ray_jobs.py maps to the dashboard, so each stage becomes a child
Ray job of the same cluster. Child jobs rather than stages run in the orchestrator's own process: each stage
keeps its own log, submission id, exit status and resources (the orchestrator's driver holds no CPU while a
stage's Ray Train or Ray Data work runs), `infgen status/logs/stop` address a stage by its job, and a stage
that crashes its driver leaves the orchestrator alive to record it.

A stage's record gets its job's submission id before the job is submitted. A rerun that finds a record still
"running" with a job that is PENDING, RUNNING or already SUCCEEDED follows that job (no second submission)
and then checks the output as usual; a FAILED or STOPPED job, or one the cluster no longer knows, is
submitted again and resumes. Stopping the orchestrator (Ctrl-C, SIGTERM from `ray job stop`) stops the stage
job it waits for and records the stage and the workflow's MLflow runs as stopped (KILLED).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from jobs.context import RunContext
from jobs.workflow.execution import follow_stage, run_stage
from jobs.workflow.records import StageRecords, update_run_record
from jobs.workflow.spec import StageSpec, WorkflowSpec, load_workflow, stage_options
from jobs.workflow.tracking import WorkflowTracking
from pipelines.common.errors import StageError
from pipelines.common.files import absolute
from pipelines.common.ray_job import own_submission_id


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _error_text(error: BaseException) -> str:
    from jobs.stage_environment import redact

    return redact(f"{type(error).__name__}: {error}")


class Workflow:
    def __init__(self, spec: WorkflowSpec, address: str | None = None, run_dir: str | None = None):
        """`address`: the Ray dashboard (or GCS address) to submit stages to, None to run them here;
        `run_dir` overrides the file's run_dir."""
        self.spec = spec
        self.address = None
        if address:
            from jobs.ray_jobs import dashboard_url

            self.address = dashboard_url(address)  # checked now, once: every stage goes to the same place
        self.run_dir = absolute(run_dir or spec.run_dir)
        self.tracking_uri = spec.tracking_uri or f"sqlite:///{Path(self.run_dir) / 'mlflow.db'}"
        self.records = StageRecords(spec, self.run_dir)

    def wanted(self, stage: StageSpec) -> dict:
        return self.records.wanted(stage)

    def up_to_date(self, stage: StageSpec, wanted: dict) -> bool:
        return self.records.up_to_date(stage, wanted)

    def outputs(self) -> dict[str, str]:
        return {stage.name: self.records.output(stage) for stage in self.spec.stages}

    def supersede_if_changed(self, stage: StageSpec, wanted: dict, tracking: WorkflowTracking, parent: str,
                             heading: str) -> None:  # fmt: skip
        """Move the output of a stage that last ran with another config or other inputs out of the way (and
        rename its MLflow run), so it reruns fresh. A stage that failed with the same config resumes."""
        import fsspec

        previous = self.records.read(stage)
        if not previous or self.records.same_config_and_inputs(stage, previous, wanted):
            return
        filesystem, local = fsspec.core.url_to_fs(self.records.output(stage))
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        if filesystem.exists(local):
            target = f"{self.run_dir}/superseded/{stage.name}-{stamp}"
            target_local = fsspec.core.url_to_fs(target)[1]
            filesystem.makedirs(target_local.rsplit("/", 1)[0], exist_ok=True)
            filesystem.mv(local, target_local, recursive=True)
            print(f"{heading}: config or inputs changed since it last ran; previous output moved to {target}")
        run_id = previous.get("mlflow_run_id") or tracking.stage_run(stage, parent)
        if run_id:
            tracking.mark_superseded(run_id, stage, stamp)

    def check_upstream(self, selected: list[StageSpec]) -> None:
        """A stage after --from needs its upstream stages finished already."""
        names = [stage.name for stage in selected]
        for stage in selected:
            for upstream in stage.upstream():
                if upstream not in names and self.records.output_hash(self.spec.stage(upstream)) is None:
                    raise ValueError(f"stage {stage.name} reads {upstream}, which has not finished; "
                                     f"run from {upstream} (--from {upstream})")  # fmt: skip

    def run(self, first: str | None = None, last: str | None = None) -> dict:
        selected = self.spec.select(first, last)
        self.check_upstream(selected)
        if "://" not in self.run_dir:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        tracking = WorkflowTracking(self.spec, self.run_dir, self.tracking_uri)
        parent = tracking.parent_run()
        where = f"Ray jobs on {self.address}" if self.address else "this machine (embedded Ray)"
        print(f"workflow {self.spec.name}: {len(selected)} stage(s) on {where}; MLflow run {parent}")
        orchestrator = own_submission_id()
        job = {"orchestrator": {"submission_id": orchestrator}} if orchestrator else {}
        update_run_record(self.run_dir, workflow=self.spec.name, source=self.spec.source,
                          stages=self.spec.stage_names(), selected=[stage.name for stage in selected],
                          tracking_uri=self.tracking_uri, parent_run_id=parent, stage_address=self.address,
                          status="running", started=_now(), finished=None, error=None,
                          **job)  # fmt: skip
        summary = {"parent_run_id": parent, "stages": {}}
        started = time.perf_counter()
        try:
            for index, stage in enumerate(selected, start=1):
                heading = f"workflow {self.spec.name}: [{index}/{len(selected)}] {stage.name}"
                summary["stages"][stage.name] = self.run_one(stage, tracking, parent, heading)
        except BaseException as error:
            stopped = isinstance(error, KeyboardInterrupt)
            text = _error_text(error)
            tracking.finished(parent, "KILLED" if stopped else "FAILED", text)
            update_run_record(self.run_dir, status="stopped" if stopped else "failed", finished=_now(),
                              error=text)  # fmt: skip
            raise
        run_ids = {
            stage.name: (self.records.read(stage) or {}).get("mlflow_run_id") for stage in self.spec.stages
        }
        table = tracking.publish(parent, self.outputs(), run_ids)
        if table:
            print(table)
        tracking.finished(parent, "FINISHED")
        update_run_record(self.run_dir, status="finished", finished=_now(), error=None)
        self.say_where(parent)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        return summary

    def run_one(self, stage: StageSpec, tracking: WorkflowTracking, parent: str, heading: str) -> str:
        wanted = self.wanted(stage)
        if self.up_to_date(stage, wanted):
            print(f"{heading}: up to date, skipped")
            return "skipped"
        missing = [name for name, digest in wanted["inputs"].items() if digest is None]
        if missing:
            raise StageError(f"stage {stage.name}: input stage(s) {missing} have no finished output")
        previous = self.records.read(stage)
        attach = self.job_to_follow(stage, previous, wanted)
        if attach is None:
            self.supersede_if_changed(stage, wanted, tracking, parent, heading)
        output = self.records.output(stage)
        stage_started = time.perf_counter()
        # A followed job's command has its run (and may have ended it already); any other try opens one now.
        run_id = (attach and previous.get("mlflow_run_id")) or tracking.open_stage_run(stage, parent, output)
        record = {**wanted, "status": "running", "started": _now(), "mlflow_run_id": run_id}
        if self.address:
            slug = f"{self.spec.name}-{stage.name}".lower()
            submission_id = attach or f"infgen-{slug[:50]}-{uuid.uuid4().hex[:8]}"
            record.update(submission_id=submission_id, ray_address=self.address)
            if attach:
                record["started"] = previous.get("started", record["started"])
        self.records.write(stage, record)  # before the job exists: a rerun can always find it
        context = RunContext(tracking_uri=self.tracking_uri, parent_run_id=parent, run_name=stage.name,
                             experiment=self.spec.experiment)  # fmt: skip
        try:
            if attach:
                print(f"{heading}: its Ray job {attach} from an earlier try is still there; following it")
                follow_stage(self.address, attach)
            else:
                print(f"{heading}: infgen {' '.join(wanted['arguments'])}")
                options = stage_options(self.spec, stage, self.run_dir)
                metadata = {"infgen_workflow": self.spec.name, "infgen_run_dir": self.run_dir,
                            "infgen_stage": stage.name}  # fmt: skip
                run_stage(
                    stage.command, options, context, self.address, record.get("submission_id"), metadata
                )
        except BaseException as error:
            stopped = isinstance(error, KeyboardInterrupt)
            text = _error_text(error) if not stopped else "stopped (Ctrl-C, SIGTERM or infgen stop)"
            self.records.write(stage, {**record, "status": "stopped" if stopped else "failed", "error": text,
                                       "finished": _now()})  # fmt: skip
            tracking.end_stage_run(run_id, "KILLED" if stopped else "FAILED", text)
            raise
        digest = self.records.output_hash(stage)
        if digest is None:
            self.records.write(stage, {**record, "status": "failed", "error": "no finished output"})
            tracking.end_stage_run(run_id, "FAILED", f"no finished output at {output}")
            raise StageError(f"stage {stage.name} ended without a finished output at {output}")
        tracking.log_inputs(stage, run_id, wanted["inputs"], self.outputs())
        seconds = round(time.perf_counter() - stage_started, 1)
        finished = {"status": "complete", "output": output, "output_hash": digest, "mlflow_run_id": run_id,
                    "seconds": seconds, "finished": _now()}  # fmt: skip
        self.records.write(stage, {**record, **finished})
        tracking.stage_seconds(parent, stage, seconds)
        print(f"{heading}: done in {seconds:.0f}s")
        return "ran"

    def job_to_follow(self, stage: StageSpec, previous: dict | None, wanted: dict) -> str | None:
        """The submission id of this stage's job from an earlier try (its record still says running, with the
        same config and inputs) when the cluster still has it PENDING, RUNNING or SUCCEEDED."""
        if not self.address or not previous or previous.get("status") != "running":
            return None
        submission_id = previous.get("submission_id")
        if not submission_id or not self.records.same_config_and_inputs(stage, previous, wanted):
            return None
        from jobs.ray_jobs import connect, job_status

        status = job_status(connect(self.address), submission_id)
        return submission_id if status in ("PENDING", "RUNNING", "SUCCEEDED") else None

    def say_where(self, parent: str) -> None:
        print(f"workflow {self.spec.name}: finished. Results under {self.run_dir}")
        if self.tracking_uri.startswith("sqlite:///"):
            print(f"  see them in MLflow:  mlflow ui --backend-store-uri {self.tracking_uri}")
        else:
            print(f"  see them in MLflow at {self.tracking_uri} (parent run {parent})")


def run_workflow(path: str, first: str | None = None, last: str | None = None, address: str | None = None,
                 run_dir: str | None = None, text: str | None = None):  # fmt: skip
    """Run the workflow file at `path` (`text`: its content, sent along by `infgen run --detach`). `address`
    defaults to RAY_API_SERVER_ADDRESS, then RAY_ADDRESS (inside a Ray job: its own cluster)."""
    from jobs.ray_jobs import dashboard_address

    spec = load_workflow(path, text=text)
    return Workflow(spec, dashboard_address(address), run_dir).run(first, last)
