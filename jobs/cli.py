"""The `infgen` command.

    infgen decode --checkpoint CKPT --latents FILE.npy --size 2160x3840 --out out.png [--vae VAE_DIR]
    infgen ingest (--metadata META... | --embedded ROWS | --regenerate MANIFEST) --output OUT
    infgen latents --images OUT/images --output LATENTS [--preset stage1|stage2|embedded] [--vae DIR]
    infgen train --preset stage1|stage2|stage1-small|stage2-small --latents L --images I --output RUN
    infgen evaluate --decoder D --images I --latents L --output EVAL [--latent-file NAME=PATH ...]
    infgen run WORKFLOW.yaml [--from STAGE] [--until STAGE] [--address http://HEAD:8265 [--detach]]
    infgen status RUN_DIR [--address URL]      infgen logs RUN_DIR [STAGE] [--follow]      infgen stop RUN_DIR

Addresses: `--address` of run/status/logs/stop is the cluster's dashboard, http://HEAD:8265 (a GCS address,
HEAD:6379, is mapped to it); default RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, which inside a Ray job is set
to its own cluster. A stage command's `--ray-address` is what `ray.init` takes (HEAD:6379, ray://, auto).

Each subcommand's options come from its typed options in jobs/registry.py; heavy dependencies are imported
only when a command runs, so `infgen --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from jobs import logs_command, status_command, stop_command
from jobs.context import RunContext
from jobs.options import add_arguments, from_namespace
from jobs.registry import COMMANDS, run_command

MONITORS = {"status": status_command, "logs": logs_command, "stop": stop_command}

# The packages of the `pipeline` extra (pyproject.toml), by import name.
PIPELINE_PACKAGES = {"ray", "deepspeed", "img2dataset", "pyarrow", "fsspec", "lpips", "mlflow", "cleanfid",
                     "diffusers", "scipy", "yaml", "pandas", "requests"}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infgen", description=__doc__.split("\n")[0])
    subcommands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        subparser = subcommands.add_parser(command.name, help=command.help)
        add_arguments(subparser, command.options)
        if command.stage:
            add_arguments(subparser, RunContext)
    run = subcommands.add_parser("run", help="run a workflow file: ingest → latents → train → evaluate")
    run.add_argument("workflow", help="workflow YAML, e.g. jobs/demo.yaml")
    run.add_argument("--from", dest="first", metavar="STAGE", help="start at this stage")
    run.add_argument("--until", dest="last", metavar="STAGE", help="stop after this stage")
    run.add_argument(
        "--address",
        help="submit each stage as a Ray job to this cluster's dashboard (http://HEAD:8265, or HEAD:6379); "
        "default RAY_API_SERVER_ADDRESS, then RAY_ADDRESS (inside a Ray job: its own cluster)",
    )
    run.add_argument(
        "--detach", action="store_true", help="submit the workflow itself as a Ray job to --address; return"
    )
    run.add_argument("--run-dir", help="write the run here instead of the file's run_dir")
    for monitor in MONITORS.values():
        monitor.add_parser(subcommands)
    return parser


def run_arguments(argv: list[str]):
    """Parse and run one command line; errors propagate (ValueError for bad input, StageError...)."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_workflow_command(args)
    if args.command in MONITORS:
        return MONITORS[args.command].run(args)
    command = COMMANDS[args.command]
    options = from_namespace(command.options, args)  # checks the options together (ValueError)
    context = from_namespace(RunContext, args) if command.stage else None
    return run_command(command, options, context)


def run_workflow_command(args):
    from jobs.workflow import run_workflow
    from jobs.workflow.detached import WORKFLOW_TEXT_VARIABLE, submit_workflow

    if args.detach:
        if not args.address:
            raise ValueError("--detach submits the workflow to a cluster: give --address http://HEAD:8265")
        return submit_workflow(args.workflow, args.address, args.first, args.last, args.run_dir)
    # A detached orchestrator gets the workflow file's text with its job (the file may not be uploaded).
    return run_workflow(args.workflow, first=args.first, last=args.last, address=args.address,
                        run_dir=args.run_dir, text=os.environ.get(WORKFLOW_TEXT_VARIABLE))  # fmt: skip


def _interrupt(signal_number, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signal_number).name}")


def stage_error_within(error: BaseException):
    """The StageError an error carries from a Ray task, actor or training worker (a damaged shard found where
    it was read), None when there is none. Ray wraps what a remote function raised: a task's error in
    RayTaskError (`.cause`), Ray Data's in UserCodeException (`__cause__`), Ray Train's in its worker group
    error (`worker_failures`, one per rank)."""
    from pipelines.common.errors import StageError

    seen, todo = set(), [error]
    while todo:
        candidate = todo.pop(0)
        if candidate is None or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        if isinstance(candidate, StageError):
            return getattr(candidate, "cause", None) or candidate
        todo += [getattr(candidate, "cause", None), candidate.__cause__, candidate.__context__]
        failures = getattr(candidate, "worker_failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())
    return None


def main(argv: list[str] | None = None) -> int:
    from pipelines.common.errors import StageError

    argv = sys.argv[1:] if argv is None else argv
    # Progress lines must show up live even when piped to `tee` or collected by `ray job logs`.
    sys.stdout.reconfigure(line_buffering=True)
    # `ray job stop` ends a job's driver with SIGTERM: unwind as on Ctrl-C, so a stage's MLflow run ends
    # KILLED, its record says stopped and a workflow stops the stage job it waits for.
    signal.signal(signal.SIGTERM, _interrupt)
    name = argv[0] if argv else "infgen"
    try:
        run_arguments(argv)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in PIPELINE_PACKAGES:
            raise
        # `pip install infgen` is the model library; the stages need the pipeline extra.
        print(f"infgen {name}: needs {error.name}, which is not installed: pip install 'infgen[pipeline]'",
              file=sys.stderr)  # fmt: skip
        return 2
    except (ValueError, FileNotFoundError) as error:
        # Bad input is the user's to fix: say what is wrong, without a traceback through our internals. A
        # Ray task's error carries the remote traceback; its cause is the message.
        print(f"infgen {name}: error: {getattr(error, 'cause', None) or error}", file=sys.stderr)
        return 2
    except StageError as error:
        # A stage's own reason, also when raised in a Ray task or actor (a damaged shard): the cause alone.
        print(f"infgen {name}: stopped: {getattr(error, 'cause', None) or error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        from jobs.ray_jobs import JobFailed

        if not isinstance(error, JobFailed):
            return _stopped_by_stage_error_or_raise(name, error)
        print(f"infgen {name}: stopped: {error}", file=sys.stderr)  # a stage's Ray job: its log tail says why
        return 1
    except KeyboardInterrupt as interrupt:
        # Ctrl-C or SIGTERM: one line, not a traceback. What was written stays; the stages resume from it.
        how = str(interrupt) or "Ctrl-C"
        print(f"infgen {name}: interrupted ({how}); run the same command again to resume", file=sys.stderr)
        return 143 if "SIGTERM" in how else 130  # the shell's 128 + signal number
    except Exception as error:
        return _stopped_by_stage_error_or_raise(name, error)
    return 0


def _stopped_by_stage_error_or_raise(name: str, error: Exception) -> int:
    cause = stage_error_within(error)
    if cause is None:
        raise error
    print(f"infgen {name}: stopped: {cause}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
