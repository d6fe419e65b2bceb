"""Running one workflow stage: here, in this process on its embedded Ray, straight through the command's typed
entry point (inside its live MLflow run, jobs.registry.run_command); or, with a cluster address, as a Ray job
whose command line is made from the same options (jobs/ray_jobs.py), with its log streamed here. The caller
chooses the job's submission id and records it before the job is submitted; `follow_stage` attaches to a
stage job submitted earlier (by an orchestrator that died since)."""

from __future__ import annotations

from pathlib import Path

from jobs.context import RunContext
from jobs.options import to_argv
from jobs.registry import COMMANDS, run_command

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def run_stage(command: str, options, context: RunContext, address: str | None, submission_id: str,
              metadata: dict[str, str] | None = None) -> None:  # fmt: skip
    if address is None:
        run_command(COMMANDS[command], options, context)
        return
    from jobs.ray_jobs import submit_stage
    from jobs.stage_environment import stage_environment

    submit_stage(
        address,
        [command, *to_argv(options), *to_argv(context, last=None)],
        working_dir=str(PROJECT_ROOT),
        env_vars=stage_environment(tracking_uri=context.tracking_uri),
        submission_id=submission_id,
        metadata=metadata,
    )


def follow_stage(address: str, submission_id: str) -> None:
    from jobs.ray_jobs import follow_job

    follow_job(address, submission_id)
