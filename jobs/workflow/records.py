"""The workflow's records, RUN_DIR/workflow/<stage>.json: what each stage last ran with, and what it made.

A record holds the stage's command line (`arguments`, for people and for Ray jobs), the hash of its config
(`config_hash`: its options, without the resource ones), the hashes of its inputs (the outputs of the stages
it reads) and the hash of its own output. A stage is up to date when all three still match.

A stage's output hash is the sha256 of OUTPUT/manifest.json once its status is "complete", provided every
file the manifest vouches for still holds what it recorded: the few files in `checksums` (e.g. training's
final decoder) are hashed again, the shards in `shard_files` (pipelines/common/shard_integrity.py) are only
listed (missing or resized), since re-hashing a 160 GB latent folder on every rerun would cost more than the
stage. A missing, unfinished or damaged output has none, so the stage reruns and redoes what is damaged. Every
stage is treated alike: there is no per-command case.

While a stage runs its record says "running", with its MLflow run (`mlflow_run_id`, opened before the stage
starts) and, for a Ray job, the job's `submission_id` and the dashboard it went to (`ray_address`), written
before the job is submitted: a rerun after the orchestrator died finds the job and follows it instead of
submitting it twice. RUN_DIR/workflow/_run.json is the workflow run's own record (`RunRecord`): its stages in
order, its MLflow parent run and tracking URI, and the Ray job of the orchestrator itself when it runs as one;
`infgen status` reads both.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json

import fsspec

from jobs.options import add_arguments, from_namespace, output_defining
from jobs.registry import COMMANDS
from jobs.workflow.spec import StageSpec, WorkflowSpec, stage_arguments, stage_output
from pipelines.common.files import exists, file_sha256, write_json
from pipelines.common.shard_integrity import output_damage

RECORD_VERSION = 1
RUN_RECORD = "_run.json"  # not a stage's: stage names start with a letter or digit


def text_hash(values) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def output_hash(output: str) -> str | None:
    """sha256 of the output's manifest, None when the stage has not finished there (or a file the manifest
    vouches for has changed since, or a shard it lists is missing or resized)."""
    filesystem, local = fsspec.core.url_to_fs(f"{output.rstrip('/')}/manifest.json")
    if not filesystem.exists(local):
        return None
    content = filesystem.cat_file(local)
    manifest = json.loads(content)
    if manifest.get("status") != "complete":
        return None
    for relative, digest in (manifest.get("checksums") or {}).items():
        path = f"{output.rstrip('/')}/{relative}"
        if not exists(path) or file_sha256(path) != digest:
            return None
    if output_damage(output, manifest):
        return None
    return hashlib.sha256(content).hexdigest()


def config_hash(command: str, arguments: list[str]) -> str | None:
    """The hash of what a stage's output depends on, from its command line (`arguments` starts with the
    command): recomputed from every record, so records written before an option counted as a resource
    option (and left the hash) still match. None when the line no longer parses (an older command)."""
    parser = argparse.ArgumentParser(prog=f"infgen {command}", exit_on_error=False, add_help=False)
    add_arguments(parser, COMMANDS[command].options)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints its complaint before exiting
            options = from_namespace(COMMANDS[command].options, parser.parse_args(arguments[1:]))
    except (argparse.ArgumentError, ValueError, SystemExit):
        return None
    return text_hash(output_defining(options, COMMANDS[command].resource_fields()))


class StageRecords:
    def __init__(self, spec: WorkflowSpec, run_dir: str):
        self.spec, self.run_dir = spec, run_dir
        self.folder = f"{run_dir}/workflow"

    def path(self, stage: StageSpec) -> str:
        return f"{self.folder}/{stage.name}.json"

    def read(self, stage: StageSpec) -> dict | None:
        filesystem, local = fsspec.core.url_to_fs(self.path(stage))
        return json.loads(filesystem.cat_file(local)) if filesystem.exists(local) else None

    def write(self, stage: StageSpec, record: dict) -> None:
        write_json(self.path(stage), {"record_version": RECORD_VERSION, "stage": stage.name, **record})

    def output(self, stage: StageSpec) -> str:
        return stage_output(self.run_dir, stage)

    def output_hash(self, stage: StageSpec) -> str | None:
        return output_hash(self.output(stage))

    def wanted(self, stage: StageSpec) -> dict:
        """What a finished stage's record must say for the stage to be skipped."""
        arguments = stage_arguments(self.spec, stage, self.run_dir)
        inputs = {upstream: self.output_hash(self.spec.stage(upstream)) for upstream in stage.upstream()}
        return {
            "arguments": arguments,
            "config_hash": config_hash(stage.command, arguments),
            "inputs": inputs,
        }

    def same_config_and_inputs(self, stage: StageSpec, record: dict, wanted: dict) -> bool:
        recorded = config_hash(stage.command, record.get("arguments") or [stage.command])
        return (recorded, record.get("inputs")) == (wanted["config_hash"], wanted["inputs"])

    def up_to_date(self, stage: StageSpec, wanted: dict) -> bool:
        record = self.read(stage)
        if not record or record.get("status") != "complete":
            return False
        return self.same_config_and_inputs(stage, record, wanted) and record[
            "output_hash"
        ] == self.output_hash(stage)


def run_record_path(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/workflow/{RUN_RECORD}"


def read_run_record(run_dir: str) -> dict | None:
    filesystem, local = fsspec.core.url_to_fs(run_record_path(run_dir))
    return json.loads(filesystem.cat_file(local)) if filesystem.exists(local) else None


def update_run_record(run_dir: str, **changes) -> dict:
    """Merge `changes` into RUN_DIR/workflow/_run.json (a dict value merges one level deeper)."""
    record = read_run_record(run_dir) or {"record_version": RECORD_VERSION}
    for key, value in changes.items():
        merge = isinstance(value, dict) and isinstance(record.get(key), dict)
        record[key] = {**record[key], **value} if merge else value
    write_json(run_record_path(run_dir), record)
    return record
