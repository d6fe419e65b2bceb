"""`infgen run WORKFLOW.yaml --address URL --detach`: the orchestrator itself submitted as a Ray job.

The job runs `python -m jobs.cli run WORKFLOW --run-dir RUN_DIR [--from/--until]` in the uploaded project,
with the workflow file's text in its environment (INFGEN_WORKFLOW_TEXT: the file need not be inside the
project) and the stages' environment (jobs/stage_environment.py: MLflow, object-store credentials). Inside
the job `infgen run` finds its own cluster and submits each stage as a child job (jobs/workflow/runner.py).

The run directory is resolved here, where the command is typed, and passed on. The submission is recorded
in RUN_DIR/workflow/_run.json here only where the run directory is visible here (an object store, or a path
that exists here: a shared volume mounted on this machine too, or a cluster on this machine); a laptop never
creates a local copy of a cluster's /mnt/... path, which would then be mistaken for the run. The
orchestrator records itself when it starts; until then `infgen status RUN_DIR --address URL` knows the run
by its job's metadata, and afterwards reads the records on the cluster (jobs/workflow/state.py).
"""

from __future__ import annotations

import os
import shlex
import time
import uuid

from jobs.workflow.records import update_run_record
from jobs.workflow.spec import load_workflow
from pipelines.common.files import absolute

WORKFLOW_TEXT_VARIABLE = "INFGEN_WORKFLOW_TEXT"


def submit_workflow(path: str, address: str | None, first: str | None = None, last: str | None = None,
                    run_dir: str | None = None) -> dict:  # fmt: skip
    """Check the workflow here, submit its orchestrator as a Ray job, record it in RUN_DIR/workflow/_run.json
    and return {"submission_id", "address", "run_dir"} without waiting."""
    from jobs.ray_jobs import dashboard_url, submit_command
    from jobs.stage_environment import stage_environment
    from jobs.workflow.execution import PROJECT_ROOT

    spec = load_workflow(path)
    spec.select(first, last)  # bad --from/--until fail here, not in the job
    run_dir = absolute(run_dir or spec.run_dir)
    arguments = ["run", str(path), "--run-dir", run_dir]
    arguments += ["--from", first] if first else []
    arguments += ["--until", last] if last else []
    slug = spec.name.lower()[:40]
    submission_id = f"infgen-{slug}-run-{uuid.uuid4().hex[:8]}"
    environment = {**stage_environment(tracking_uri=spec.tracking_uri), WORKFLOW_TEXT_VARIABLE: spec.text}
    url = dashboard_url(address)
    submitted = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # Recorded before the job exists: the orchestrator adds to this record as soon as it starts.
    orchestrator = {"submission_id": submission_id, "address": url, "submitted": submitted}
    visible_here = "://" in run_dir or os.path.isdir(run_dir)
    if visible_here:
        update_run_record(run_dir, workflow=spec.name, stages=spec.stage_names(), status="submitted",
                          orchestrator=orchestrator)  # fmt: skip
    try:
        result = submit_command(
            url,
            shlex.join(["python", "-m", "jobs.cli", *arguments]),
            working_dir=str(PROJECT_ROOT),
            env_vars=environment,
            submission_id=submission_id,
            metadata={"infgen_workflow": spec.name, "infgen_run_dir": run_dir, "infgen_role": "orchestrator"},
            follow=False,
        )
    except BaseException as error:
        if not visible_here:
            raise
        update_run_record(
            run_dir, status="failed", error=f"submission failed: {type(error).__name__}: {error}"
        )
        raise
    print(f"workflow {spec.name}: orchestrator submitted as Ray job {submission_id}")
    print(f"  status: infgen status {run_dir} --address {result['address']}")
    print(f"  logs:   infgen logs {run_dir} [STAGE] --follow --address {result['address']}")
    print(f"  stop:   infgen stop {run_dir} --address {result['address']}")
    return {"submission_id": submission_id, "address": result["address"], "run_dir": run_dir}
