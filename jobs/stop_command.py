"""`infgen stop RUN_DIR [--address URL]`: stop a workflow run: its orchestrator's Ray job and the stage job
running now. The orchestrator, stopped, stops its stage job itself and records the run as stopped; stopping
the stage job here as well covers an orchestrator that is gone or not a Ray job (`infgen run --address` in a
terminal, which then records the stage as failed)."""

from __future__ import annotations


def add_parser(subcommands) -> None:
    parser = subcommands.add_parser("stop", help="stop a workflow run's orchestrator job and its stage job")
    parser.add_argument("run", metavar="RUN_DIR", help="the workflow's run_dir")
    parser.add_argument("--address", help="the Ray dashboard (default: where the run was submitted)")


def run(args) -> list[str]:
    from jobs.ray_jobs import connect, job_status
    from jobs.workflow.state import TERMINAL, locate_state

    state = locate_state(args.run, args.address)
    jobs = state.running_jobs()
    if not jobs:
        print(f"{state.run_dir}: nothing recorded as running")
        return []
    client = connect(state.address(args.address))
    stopped = []
    for what, submission_id in jobs:
        status = job_status(client, submission_id)
        if status is None or status in TERMINAL:
            print(f"{what}: Ray job {submission_id} is {status or 'unknown to the cluster'}; nothing to stop")
            continue
        client.stop_job(submission_id)
        stopped.append(submission_id)
        print(f"{what}: stopping Ray job {submission_id} (was {status})")
    return stopped
