"""`infgen logs RUN_DIR [STAGE] [--follow] [--address URL]`: a stage job's log (no STAGE: the orchestrator's),
from Ray, by the submission id in the run's records; --follow streams it until the job ends."""

from __future__ import annotations

import sys


def add_parser(subcommands) -> None:
    parser = subcommands.add_parser("logs", help="a workflow stage's Ray job log (or the orchestrator's)")
    parser.add_argument("run", metavar="RUN_DIR", help="the workflow's run_dir")
    parser.add_argument("stage", nargs="?", help="the stage (default: the orchestrator)")
    parser.add_argument("--follow", action="store_true", help="stream the log until the job ends")
    parser.add_argument("--address", help="the Ray dashboard (default: where the run was submitted)")


def run(args) -> str:
    from jobs.ray_jobs import connect, follow_job
    from jobs.workflow.state import locate_state

    state = locate_state(args.run, args.address)
    if args.stage is None:
        submission_id = (state.run.get("orchestrator") or {}).get("submission_id")
        if not submission_id:
            raise ValueError(f"{state.run_dir}: its orchestrator did not run as a Ray job; give a stage")
    else:
        if args.stage not in state.stages:
            raise ValueError(f"{args.stage}: no such stage in {state.run_dir} ({', '.join(state.stages)})")
        record = state.stages[args.stage] or {}
        submission_id = record.get("submission_id")
        if not submission_id:
            raise ValueError(
                f"stage {args.stage} did not run as a Ray job (its log is the output of the `infgen run` "
                f"that ran it); its record: {record.get('status', 'not run')} {record.get('error') or ''}"
            )
    address = state.address(args.address) or (state.stages.get(args.stage) or {}).get("ray_address")
    if args.follow:
        follow_job(address, submission_id)  # raises JobFailed (exit 1) when the job failed
        return submission_id
    sys.stdout.write(connect(address).get_job_logs(submission_id))
    return submission_id
