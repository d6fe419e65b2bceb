"""`infgen run WORKFLOW.yaml`: the stages of a workflow file in order, locally or as Ray jobs on a cluster.

Each finished stage leaves a record (jobs/workflow/records.py). A rerun skips every stage whose record still
matches its config, its inputs and its output, and reruns the others: the stage commands resume from what they
wrote before (finished shards, checkpoints, scored chunks), so a failed workflow picks up where it stopped. A
stage whose config or inputs changed cannot resume into its old output (the stages refuse to mix runs): that
output moves to RUN_DIR/superseded/ (nothing deleted) and the stage runs fresh. MLflow:
jobs/workflow/tracking.py.

Locally the stages run in this process on one embedded Ray; with --address (or RAY_ADDRESS) each stage is
submitted as a Ray job and its logs stream here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from jobs.context import RunContext
from jobs.workflow.execution import run_stage
from jobs.workflow.records import StageRecords
from jobs.workflow.spec import StageSpec, WorkflowSpec, load_workflow, stage_options
from jobs.workflow.tracking import WorkflowTracking
from pipelines.common.errors import StageError
from pipelines.common.files import absolute


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Workflow:
    def __init__(self, spec: WorkflowSpec, address: str | None = None):
        self.spec, self.address = spec, address
        self.run_dir = absolute(spec.run_dir)
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
        summary = {"parent_run_id": parent, "stages": {}}
        started = time.perf_counter()
        try:
            for index, stage in enumerate(selected, start=1):
                heading = f"workflow {self.spec.name}: [{index}/{len(selected)}] {stage.name}"
                summary["stages"][stage.name] = self.run_one(stage, tracking, parent, heading)
        except BaseException:
            tracking.finished(parent, ok=False)
            raise
        table = tracking.publish(parent, self.outputs())
        if table:
            print(table)
        tracking.finished(parent, ok=True)
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
        self.supersede_if_changed(stage, wanted, tracking, parent, heading)
        print(f"{heading}: infgen {' '.join(wanted['arguments'])}")
        stage_started = time.perf_counter()
        record = {**wanted, "status": "running", "started": _now()}
        self.records.write(stage, record)
        context = RunContext(tracking_uri=self.tracking_uri, parent_run_id=parent, run_name=stage.name,
                             experiment=self.spec.experiment)  # fmt: skip
        try:
            options = stage_options(self.spec, stage, self.run_dir)
            run_stage(stage.command, options, context, self.address, f"infgen-{self.spec.name}-{stage.name}")
        except BaseException as error:
            self.records.write(
                stage, {**record, "status": "failed", "error": f"{type(error).__name__}: {error}"}
            )
            raise
        output = self.records.output(stage)
        digest = self.records.output_hash(stage)
        if digest is None:
            self.records.write(stage, {**record, "status": "failed", "error": "no finished output"})
            raise StageError(f"stage {stage.name} ended without a finished output at {output}")
        run_id = tracking.stage_run(stage, parent)
        if run_id:
            tracking.log_inputs(stage, run_id, wanted["inputs"], self.outputs())
        seconds = round(time.perf_counter() - stage_started, 1)
        finished = {"status": "complete", "output": output, "output_hash": digest, "mlflow_run_id": run_id,
                    "seconds": seconds, "finished": _now()}  # fmt: skip
        self.records.write(stage, {**record, **finished})
        tracking.stage_seconds(parent, stage, seconds)
        print(f"{heading}: done in {seconds:.0f}s")
        return "ran"

    def say_where(self, parent: str) -> None:
        print(f"workflow {self.spec.name}: finished. Results under {self.run_dir}")
        if self.tracking_uri.startswith("sqlite:///"):
            print(f"  see them in MLflow:  mlflow ui --backend-store-uri {self.tracking_uri}")
        else:
            print(f"  see them in MLflow at {self.tracking_uri} (parent run {parent})")


def run_workflow(path: str, first: str | None = None, last: str | None = None, address: str | None = None):
    spec = load_workflow(path)
    address = address or os.environ.get("RAY_ADDRESS") or None
    return Workflow(spec, address).run(first, last)
