"""Shared by the stage commands: the --tracking-uri / --parent-run-id options and the MLflow callback that
logs a finished stage's manifest (config as params, counts as metrics, the manifest itself as an artifact)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or runs/mlflow.db)"
    )
    parser.add_argument("--parent-run-id", help="MLflow run to nest this stage's run under")
    parser.add_argument("--run-name", help="MLflow run name (default: the stage's command name)")
    parser.add_argument(
        "--experiment", help="MLflow experiment (default: the stage's own; a workflow passes its own)"
    )


def manifest_tracker(args: argparse.Namespace, stage: str):
    """A `tracking(manifest, manifest_path)` callback for the stage's run function."""
    from pipelines.tracking import default_tracking_uri, flatten, log_stage_run

    uri = args.tracking_uri or default_tracking_uri()

    def track(manifest: dict, manifest_path: str) -> None:
        metrics = {k: float(v) for k, v in flatten(manifest["counts"]).items() if isinstance(v, (int, float))}
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / "manifest.json"
            local.write_text(
                json.dumps(manifest, indent=2)
            )  # the manifest may be remote; MLflow wants a file
            run_id = log_stage_run(
                uri,
                args.experiment or manifest["config"]["mlflow_experiment"],
                args.run_name or stage,
                params={
                    "config": manifest["config"],
                    "inputs": len(manifest["inputs"]),
                    "output": manifest_path,
                },
                metrics=metrics,
                artifacts=[str(local)],
                parent_run_id=args.parent_run_id,
            )
        print(f"{stage}: MLflow run {run_id} at {uri}")

    return track
