"""`infgen status RUN_DIR [--address URL]`: where a workflow run stands, stage by stage.

From the records alone (RUN_DIR/workflow/): each stage's state, its Ray job, its MLflow run, its duration or
the end of its error. With --address (the dashboard, or a GCS address) the Ray jobs' live states too, and the
log tail of a failed stage job; the stage runs' progress metrics come from MLflow. `infgen status NAME
--address URL` finds the run directory of the workflow called NAME from its orchestrator job's metadata.
"""

from __future__ import annotations

import os

LOG_TAIL_LINES = 12


def add_parser(subcommands) -> None:
    parser = subcommands.add_parser("status", help="where a workflow run stands: each stage's state and job")
    parser.add_argument(
        "run", metavar="RUN_DIR", help="the workflow's run_dir (or, with --address, its name)"
    )
    parser.add_argument("--address", help="ask this Ray cluster for live job states (http://HEAD:8265)")


def run(args) -> dict:
    from jobs.ray_jobs import connect, job_status
    from jobs.workflow.state import locate_state, run_dir_of_workflow

    run_dir, client = args.run, None
    if args.address:
        client = connect(args.address)
        if "/" not in run_dir and not os.path.isdir(run_dir):  # a workflow's name, not a path
            found = run_dir_of_workflow(client, run_dir)
            if found is None:
                raise FileNotFoundError(f"{run_dir}: neither a run directory nor a workflow with an "
                                        f"orchestrator job on {client.get_address()}")  # fmt: skip
            run_dir = found
    state = locate_state(run_dir, args.address)
    run = state.run
    orchestrator = (run.get("orchestrator") or {}).get("submission_id")
    summary = {
        "run_dir": state.run_dir,
        "status": run.get("status"),
        "orchestrator": orchestrator,
        "stages": {},
    }
    head = f"workflow {run.get('workflow', '?')} in {state.run_dir}: {run.get('status', 'unknown')}"
    if orchestrator:
        live = job_status(client, orchestrator) if client else None
        summary["orchestrator_job"] = live
        head += f"; orchestrator Ray job {orchestrator}" + (f" {live}" if live else "")
    print(head)
    if summary.get("orchestrator_job") == "FAILED" and client:  # e.g. it could not even start
        print(
            "\n".join(
                f"      | {line}" for line in last_lines(client.get_job_logs(orchestrator), 5).splitlines()
            )
        )
    if run.get("parent_run_id"):
        print(f"  MLflow: parent run {run['parent_run_id']} at {run.get('tracking_uri')}")
    if run.get("error"):
        print(f"  error: {run['error'].splitlines()[0]}")
    for name, record in state.stages.items():
        summary["stages"][name] = describe_stage(name, record, run, client)
    return summary


def describe_stage(name: str, record: dict | None, run: dict, client) -> dict:
    from jobs.ray_jobs import job_status
    from jobs.workflow.state import TERMINAL, stage_progress

    if record is None:
        print(f"  {name:<16} not run")
        return {"state": "not run"}
    state = record.get("status", "?")
    job = record.get("submission_id")
    live = job_status(client, job) if client and job else None
    if state == "running" and live in TERMINAL:  # the orchestrator died before it could record the end
        state = f"running? (job {live})"
    progress = ""
    run_status = None
    if record.get("mlflow_run_id") and run.get("tracking_uri"):
        try:
            run_status, metrics = stage_progress(run["tracking_uri"], record["mlflow_run_id"])
            progress = ", ".join(f"{key} {value:g}" for key, value in sorted(metrics.items()))
        except Exception as error:  # MLflow unreachable from here: the records still tell the rest
            progress = f"(MLflow: {type(error).__name__})"
    if state == "complete" and record.get("seconds") is not None:
        progress = f"{record['seconds']:.0f}s" + (f"; {progress}" if progress else "")
    parts = [f"  {name:<16} {state:<10}", progress]
    parts += [f"job {job}" + (f" {live}" if live else "")] if job else []
    parts += [f"MLflow run {record['mlflow_run_id']}"] if record.get("mlflow_run_id") else []
    print("  ".join(part for part in parts if part))
    tail = None
    if state in ("failed", "stopped") or (live in ("FAILED", "STOPPED")):
        tail = record.get("error") or ""
        if client and job:
            tail = client.get_job_logs(job) or tail
        if tail:
            print("\n".join(f"      | {line}" for line in last_lines(tail, LOG_TAIL_LINES).splitlines()))
    return {"state": state, "job": job, "job_status": live, "mlflow_run_id": record.get("mlflow_run_id"),
            "mlflow_status": run_status, "progress": progress, "tail": tail}  # fmt: skip


def last_lines(text: str, count: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-count:])
