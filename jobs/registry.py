"""The commands: each a typed entry point `run(options, context) → manifest`, with its options dataclass.

The CLI (jobs/cli.py) builds its parsers from here; the workflow (jobs/workflow/) builds options from YAML
and runs stages through here, with no command line in between; a Ray job gets a command line made from the
options (jobs.options.to_argv). Stage commands write OUTPUT/manifest.json and take the run context
(jobs/context.py); `decode` is a tool, not a stage.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from jobs import (
    decode_command,
    evaluate_command,
    ingest_command,
    latents_command,
    photos_command,
    train_command,
)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    options: type  # the options dataclass
    run: Callable  # (options, RunContext) → manifest (a stage) or the tool's result
    resource_fields: Callable[[], tuple[str, ...]] = tuple  # options that say how it runs, not what it makes
    stage: bool = True  # writes OUTPUT/manifest.json; may run in a workflow
    experiment: str = ""  # a stage's own MLflow experiment (its config's mlflow_experiment)
    run_name: Callable | None = None  # (options) → its MLflow run's default name; None: the command's name
    # (options) → the stage's config, built as the command builds it: a value out of range or a rule across
    # options (and the preset) fails when a workflow file loads, not when the stage starts days later.
    check: Callable | None = None


COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command("decode", "decode latents to images of any size", decode_command.DecodeOptions,
                decode_command.run_decode, stage=False),
        Command("ingest", "metadata → verified >2 MP images in Parquet shards (Ray)",
                ingest_command.IngestOptions, ingest_command.run_ingest_command, experiment="infgen-ingest",
                check=lambda options: ingest_command.build_config(options, options.embedded is not None)),
        Command("latents", "image shards → frozen-VAE latent shards (Ray Data)",
                latents_command.LatentsOptions, latents_command.run_latents_command,
                latents_command.RESOURCE_FIELDS, experiment="infgen-latents",
                check=latents_command.build_config),
        Command("train", "one decoder training stage (Ray Train + DeepSpeed)", train_command.TrainOptions,
                train_command.run_train_command, train_command.RESOURCE_FIELDS, experiment="infgen-train",
                run_name=lambda options: os.path.basename(options.output.rstrip("/")),
                check=train_command.build_config),
        Command("photos", "held-out real photographs (scikit-image) → PNG folder for evaluate --images-dir",
                photos_command.PhotosOptions, photos_command.run_photos_command, experiment="infgen-photos"),
        Command("evaluate", "InfGen vs stock VAE decoder: FID/FIDp/PSNR... (Ray)",
                evaluate_command.EvaluateOptions, evaluate_command.run_evaluate_command,
                evaluate_command.RESOURCE_FIELDS, experiment="infgen-eval",
                check=evaluate_command.build_config),
    )
}  # fmt: skip
STAGE_COMMANDS = tuple(name for name, command in COMMANDS.items() if command.stage)


def run_command(command: Command, options, context):
    """Run a command; a stage inside its live MLflow run (opened RUNNING now, ended FINISHED, FAILED or
    KILLED: pipelines/common/tracking.py), the run a workflow opened for it if there is one."""
    if not command.stage:
        return command.run(options, context)
    from jobs.stage_environment import redact
    from pipelines.common.files import absolute
    from pipelines.common.tracking import live_stage_run

    run_name = command.run_name(options) if command.run_name else command.name
    output = absolute(options.output)
    with live_stage_run(context.tracking(), command.experiment, run_name, output, redact):
        return command.run(options, context)
