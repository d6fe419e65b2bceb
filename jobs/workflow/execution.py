"""Running one workflow stage: here, in this process on its embedded Ray, straight through the command's typed
entry point; or, with a cluster address, as a Ray job whose command line is made from the same options
(jobs/ray_jobs.py), with its log streamed here."""

from __future__ import annotations

import time
from pathlib import Path

from jobs.context import RunContext
from jobs.options import to_argv
from jobs.registry import COMMANDS

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def run_stage(command: str, options, context: RunContext, address: str | None, submission_id: str) -> None:
    if address is None:
        COMMANDS[command].run(options, context)
        return
    from jobs.ray_jobs import submit_stage

    submit_stage(
        address,
        [command, *to_argv(options), *to_argv(context, last=None)],
        working_dir=str(PROJECT_ROOT),
        env_vars={"MLFLOW_TRACKING_URI": context.tracking_uri},
        submission_id=f"{submission_id}-{int(time.time())}",
    )
