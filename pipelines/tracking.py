"""MLflow tracking shared by the stages: one run per stage, nested under the workflow's run when given.

The tracking URI comes from the caller (the CLI's --tracking-uri, else MLFLOW_TRACKING_URI, else a SQLite
file under runs/): never a local `mlruns` folder, which MLflow ≥ 3.13 refuses (ecosystem.md §5).
"""

from __future__ import annotations

import os
from pathlib import Path


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers run in other directories); URLs unchanged."""
    return path if "://" in path else str(Path(path).resolve())


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('runs/mlflow.db').resolve()}"


def local_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts beside a SQLite store (MLflow's default would be ./mlruns under whatever the current
    directory is); a tracking server chooses its own (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    return (database.parent / "mlartifacts").resolve().as_uri()


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} → {"a.b": 1}: MLflow params and metrics are flat (ray#33246)."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def log_stage_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: dict,
    metrics: dict[str, float],
    artifacts: list[str],
    parent_run_id: str | None = None,
    extra=None,
) -> str:
    """Log one finished stage as an MLflow run; returns its run id. `extra(mlflow)`, if given, logs more
    (tables, images) inside the same run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=local_artifact_location(tracking_uri))
        except mlflow.exceptions.MlflowException:
            pass  # another stage created it in the meantime; set_experiment below finds it
    mlflow.set_experiment(experiment)
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(path)
        if extra is not None:
            extra(mlflow)
    return run.info.run_id
