"""A stage's output folder, from claim to manifest: the two ends every stage shares.

`claim_output`: before writing anything, a stage records what it is about to make (its config and inputs) in
OUTPUT/<record>. A rerun with the same record resumes into the folder; a different one is refused, so two runs
never mix in one output. Settings that say how a stage runs (how many actors, how much memory) change no
result, so they stay out of the comparison: a resume on a larger cluster may change them.

`finish_stage`: the tail. It writes OUTPUT/manifest.json (written whole, then renamed: a manifest that exists
is complete), stops with the manifest's problems if its status is not "complete" (the manifest stays, for
inspection), and logs the stage's MLflow run.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.common.errors import StageError
from pipelines.common.files import code_version, exists, read_json, write_json
from pipelines.common.tracking import StageTracking, flatten, log_stage_run

MANIFEST_NAME = "manifest.json"


def manifest_path(output: str) -> str:
    return f"{output.rstrip('/')}/{MANIFEST_NAME}"


def _comparable(record: dict, resource_fields: tuple[str, ...]) -> dict:
    # JSON round trip: tuples become lists, as they are once read back from the file.
    record = json.loads(json.dumps(record))
    config = {key: value for key, value in record.get("config", {}).items() if key not in resource_fields}
    return {"config": config, "inputs": record.get("inputs")}


def claim_output(output: str, record_name: str, wanted: dict, resource_fields: tuple[str, ...] = (),
                 what: str = "another config or other inputs") -> dict:  # fmt: skip
    """Write OUTPUT/record_name = `wanted` ({"config", "inputs"}), or check the one there; returns the
    record as it stands (a finished stage may have added to it). A record from before a resource field
    existed still matches."""
    path = f"{output.rstrip('/')}/{record_name}"
    if not exists(path):
        write_json(path, wanted)
        return wanted
    recorded = read_json(path, f"{record_name} record")
    if _comparable(recorded, resource_fields) != _comparable(wanted, resource_fields):
        raise ValueError(f"{output} holds {what}; use a new output folder")
    return recorded


def manifest_header(version: int, status: str = "complete", problems: list[str] | None = None) -> dict:
    """What every stage's manifest starts with: its format version, status (and problems), when and by
    which code it was made."""
    header = {"manifest_version": version, "status": status}
    if problems is not None:
        header["problems"] = problems
    header["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    header["code_version"] = code_version()
    return header


def finish_stage(stage: str, output: str, manifest: dict, tracking: StageTracking | None,
                 progress: Callable[[str], None] = print, metrics: dict[str, float] | None = None,
                 extra=None) -> dict:  # fmt: skip
    """Write the manifest, refuse an incomplete one, log the stage's run; returns the manifest. `metrics`
    default to the manifest's numeric counts; `extra(mlflow)` logs more inside the run."""
    path = manifest_path(output)
    write_json(path, manifest)
    if manifest["status"] != "complete":
        raise StageError(f"{stage}: {'; '.join(manifest.get('problems') or [manifest['status']])} "
                         f"(manifest {path}, status {manifest['status']!r})")  # fmt: skip
    if tracking is None:
        return manifest
    if metrics is None:
        counts = flatten(manifest.get("counts", {}))
        metrics = {key: float(value) for key, value in counts.items() if isinstance(value, (int, float))}
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / MANIFEST_NAME
        local.write_text(json.dumps(manifest, indent=2))  # the manifest may be remote; MLflow wants a file
        params = {"config": manifest["config"], "output": path}
        inputs = manifest.get("inputs")
        params["inputs"] = len(inputs) if isinstance(inputs, list) else inputs
        experiment = manifest["config"].get("mlflow_experiment", f"infgen-{stage}")
        run_id = log_stage_run(tracking, experiment, stage, params, metrics, [str(local)], extra)
    progress(f"{stage}: MLflow run {run_id} at {tracking.uri}")
    return manifest
