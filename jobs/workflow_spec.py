"""A workflow file: the pipeline's stages in order, each a stage command with its options.

    name: demo
    run_dir: runs/demo                 # every stage writes RUN_DIR/<stage name>
    experiment: infgen-demo            # MLflow: one parent run per workflow, a nested run per stage
    tracking_uri: null                 # default: sqlite:///RUN_DIR/mlflow.db
    stages:
      - name: ingest
        command: ingest                # ingest | latents | train | evaluate (the `infgen` subcommands)
        options: {embedded: 120}       # the command's options, no dashes; `{stage}`: that stage's output
      - name: latents
        command: latents
        options: {images: "{ingest}/images", preset: embedded}

Options are checked with the command's own parser when the file is loaded, so a typo fails before anything
runs, with the stage and option named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

COMMANDS = ("ingest", "latents", "train", "evaluate")
# Options the workflow sets itself: the output location and MLflow nesting.
RESERVED = {"output", "storage", "name", "tracking-uri", "parent-run-id", "experiment", "run-name",
            "ray-address"}  # fmt: skip
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_\-]+)\}")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class StageSpec:
    name: str
    command: str
    options: dict = field(default_factory=dict)

    def upstream(self) -> list[str]:
        """Stages whose outputs this one reads, in order of first mention."""
        names: list[str] = []
        for value in self.options.values():
            for text in value if isinstance(value, list) else [value]:
                for match in PLACEHOLDER.findall(str(text)):
                    if match not in names:
                        names.append(match)
        return names


@dataclass(frozen=True)
class WorkflowSpec:
    name: str
    run_dir: str
    stages: tuple[StageSpec, ...]
    experiment: str = "infgen-workflow"
    tracking_uri: str | None = None
    source: str = ""

    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def select(self, first: str | None, last: str | None) -> list[StageSpec]:
        names = self.stage_names()
        for option, value in (("--from", first), ("--until", last)):
            if value is not None and value not in names:
                raise ValueError(
                    f"{option} {value}: no such stage in {self.source} (stages: {', '.join(names)})"
                )
        start = names.index(first) if first else 0
        end = names.index(last) + 1 if last else len(names)
        if start >= end:
            raise ValueError(f"--from {first} comes after --until {last}")
        return list(self.stages[start:end])


def load_workflow(path: str | Path) -> WorkflowSpec:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workflow file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"workflow file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"workflow file {path}: expected a mapping with name, run_dir and stages")
    unknown = set(data) - {"name", "run_dir", "stages", "experiment", "tracking_uri"}
    if unknown:
        raise ValueError(f"workflow file {path}: unknown keys {sorted(unknown)}")
    for key in ("name", "run_dir", "stages"):
        if not data.get(key):
            raise ValueError(f"workflow file {path}: '{key}' is missing")
    if not isinstance(data["stages"], list):
        raise ValueError(f"workflow file {path}: 'stages' must be a list")
    stages, seen = [], []
    for index, entry in enumerate(data["stages"]):
        where = f"workflow file {path}, stage {index + 1}"
        if not isinstance(entry, dict) or set(entry) - {"name", "command", "options"}:
            raise ValueError(f"{where}: expected keys name, command, options")
        name, command, options = entry.get("name"), entry.get("command"), entry.get("options") or {}
        if not isinstance(name, str) or not NAME.match(name) or name in seen or name == "workflow":
            raise ValueError(f"{where}: name {name!r} must be a new plain name (letters, digits, - and _)")
        if command not in COMMANDS:
            raise ValueError(f"{where} ({name}): command {command!r} is not one of {COMMANDS}")
        if not isinstance(options, dict):
            raise ValueError(f"{where} ({name}): options must be a mapping")
        stage = StageSpec(name, command, {str(k): v for k, v in options.items()})
        for option in stage.options:
            if option in RESERVED:
                raise ValueError(f"{where} ({name}): option {option!r} is set by the workflow itself")
        for upstream in stage.upstream():
            if upstream not in seen:
                raise ValueError(f"{where} ({name}): {{{upstream}}} is not an earlier stage")
        stages.append(stage)
        seen.append(name)
    spec = WorkflowSpec(name=str(data["name"]), run_dir=str(data["run_dir"]), stages=tuple(stages),
                        experiment=str(data.get("experiment") or "infgen-workflow"),
                        tracking_uri=data.get("tracking_uri"), source=str(path))  # fmt: skip
    for stage in spec.stages:
        stage_arguments(spec, stage, run_dir="RUN_DIR")  # parses with the command's own parser
    return spec


def stage_output(run_dir: str, stage: StageSpec) -> str:
    """Where a stage writes: RUN_DIR/<name> (for train: Ray Train storage RUN_DIR, run name <name>)."""
    return f"{run_dir.rstrip('/')}/{stage.name}"


def stage_arguments(spec: WorkflowSpec, stage: StageSpec, run_dir: str) -> list[str]:
    """The `infgen` command line of a stage (without tracking options), validated by its parser."""
    outputs = {other.name: stage_output(run_dir, other) for other in spec.stages}
    repeated = _append_options(stage.command)
    known = {flag for action in _command_actions(stage.command) for flag in action.option_strings}
    arguments = [stage.command]
    for option, value in stage.options.items():
        if f"--{option}" not in known:  # argparse would take an abbreviation; records need the full name
            raise ValueError(
                f"workflow file {spec.source}, stage {stage.name}: unknown option {option!r} for "
                f"`infgen {stage.command}` (options are spelled out in full, without dashes)"
            )
        if value is True:
            arguments.append(f"--{option}")
            continue
        if value is False or value is None:
            continue
        values = [PLACEHOLDER.sub(lambda m: outputs[m.group(1)], str(item))
                  for item in (value if isinstance(value, list) else [value])]  # fmt: skip
        if f"--{option}" in repeated:  # action="append": the flag once per value
            for item in values:
                arguments += [f"--{option}", item]
        else:  # nargs="+" (or a single value): the flag once, then the values
            arguments += [f"--{option}", *values]
    if stage.command == "train":
        arguments += ["--storage", run_dir, "--name", stage.name]
    else:
        arguments += ["--output", outputs[stage.name]]
    _check(arguments, f"workflow file {spec.source}, stage {stage.name}")
    return arguments


def output_arguments(stage: StageSpec, arguments: list[str]) -> list[str]:
    """A stage's command line without its resource options (one value each): what its output depends on."""
    dropped = {f"--{field.replace('_', '-')}" for field in _resource_fields(stage.command)}
    kept, remaining = [], iter(arguments)
    for argument in remaining:
        if argument in dropped:
            next(remaining, None)  # and its value
        else:
            kept.append(argument)
    return kept


def _resource_fields(command: str) -> tuple[str, ...]:
    """The config fields that say how a stage runs, not what it makes (pipelines/output_record.py); each is
    the command's option of the same name. Changing one resumes a stage instead of superseding its output."""
    from pipelines.evaluation.config import EvalConfig
    from pipelines.latents.config import LatentConfig

    return {"latents": LatentConfig.RESOURCE_FIELDS, "evaluate": EvalConfig.RESOURCE_FIELDS}.get(command, ())


def _command_actions(command: str) -> list:
    import argparse

    from jobs.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]._actions


def _append_options(command: str) -> set[str]:
    import argparse

    return {flag for action in _command_actions(command) if isinstance(action, argparse._AppendAction)
            for flag in action.option_strings}  # fmt: skip


def _check(arguments: list[str], where: str) -> None:
    import contextlib
    import io

    from jobs.cli import build_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            build_parser().parse_args(arguments)
    except SystemExit:
        message = errors.getvalue().strip().splitlines()[-1] if errors.getvalue().strip() else "bad options"
        raise ValueError(f"{where}: {message.partition('error: ')[2] or message}") from None
