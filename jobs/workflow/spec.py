"""A workflow file: the pipeline's stages in order, each a stage command with its options.

    name: demo
    run_dir: runs/demo                 # every stage writes RUN_DIR/<stage name>
    experiment: infgen-demo            # MLflow: one parent run per workflow, a nested run per stage
    tracking_uri: null                 # default: sqlite:///RUN_DIR/mlflow.db
    stages:
      - name: ingest
        command: ingest                # ingest | latents | train | evaluate (jobs/registry.py)
        options: {embedded: 120}       # the command's options, no dashes; `{stage}`: that stage's output
      - name: latents
        command: latents
        options: {images: "{ingest}/images", preset: embedded}

Each stage's options become the command's typed options when the file is loaded (jobs/options.py), so a typo,
a bad choice or a bad number fails before anything runs, with the stage and option named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jobs.context import RunContext
from jobs.options import flag_name, from_mapping, to_argv
from jobs.registry import COMMANDS, STAGE_COMMANDS

# Options the workflow sets itself: where a stage writes, and where and under which run it logs.
RESERVED = {"output", *(flag_name(name) for name in RunContext.__dataclass_fields__)}
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_\-]+)\}")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class StageSpec:
    name: str
    command: str
    options: dict = field(default_factory=dict)  # as written in the file (placeholders unresolved)

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
    text: str = ""  # the file as it was read

    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage(self, name: str) -> StageSpec:
        return next(stage for stage in self.stages if stage.name == name)

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


def load_workflow(path: str | Path, text: str | None = None) -> WorkflowSpec:
    """The workflow file at `path`, checked; `text`: its content, read elsewhere (a detached run's
    orchestrator gets the file it was submitted with, wherever `path` was)."""
    path = Path(path)
    if text is None:
        if not path.is_file():
            raise FileNotFoundError(f"workflow file {path} does not exist")
        text = path.read_text()
    try:
        data = yaml.safe_load(text)
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
        if command not in STAGE_COMMANDS:
            raise ValueError(f"{where} ({name}): command {command!r} is not one of {STAGE_COMMANDS}")
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
                        tracking_uri=data.get("tracking_uri"), source=str(path), text=text)  # fmt: skip
    for stage in spec.stages:
        stage_options(spec, stage, run_dir="RUN_DIR")  # every option checked before anything runs
    return spec


def stage_output(run_dir: str, stage: StageSpec) -> str:
    """Where a stage writes: RUN_DIR/<name>."""
    return f"{run_dir.rstrip('/')}/{stage.name}"


def stage_options(spec: WorkflowSpec, stage: StageSpec, run_dir: str):
    """The stage's typed options, with `{stage}` placeholders resolved against `run_dir`."""
    outputs = {other.name: stage_output(run_dir, other) for other in spec.stages}
    resolved = {
        option: [PLACEHOLDER.sub(lambda m: outputs[m.group(1)], str(item)) for item in value]
        if isinstance(value, list)
        else PLACEHOLDER.sub(lambda m: outputs[m.group(1)], value)
        if isinstance(value, str)
        else value
        for option, value in stage.options.items()
    }
    command = COMMANDS[stage.command]
    try:
        options = from_mapping(
            command.options, resolved, stage.command, fixed={"output": outputs[stage.name]}
        )
        if command.check is not None:
            command.check(options)
        return options
    except ValueError as error:
        raise ValueError(f"workflow file {spec.source}, stage {stage.name}: {error}") from None


def stage_arguments(spec: WorkflowSpec, stage: StageSpec, run_dir: str) -> list[str]:
    """The stage's `infgen` command line (without the run context): what a Ray job runs, and what the
    workflow's record of the stage shows."""
    return [stage.command, *to_argv(stage_options(spec, stage, run_dir))]
