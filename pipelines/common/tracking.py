"""MLflow for every stage and the workflow: where runs go, finding them again by tag, one run per stage.

The tracking URI comes from the caller (the CLI's --tracking-uri or the workflow file), else
MLFLOW_TRACKING_URI, else a SQLite file under runs/: never a local `mlruns` folder, which MLflow ≥ 3.13
refuses (docs/dependencies.md, "MLflow"). Runs are found again by tags, so a resumed stage or a rerun
workflow logs into the run it started instead of a new one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


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


# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, prompts), where our runs
# are one click away; "custom_model_development" ("Machine learning" in the UI) opens it on its runs. The
# tag name and value are MLflow's own (mlflow/server/js: ExperimentKind; the onboarding skill documents it).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """The experiment called `name`, created (artifacts beside a SQLite store, kind: model development) if it
    does not exist yet; one of ours made before the kind tag existed gets it too."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=local_artifact_location(tracking_uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})  # fmt: skip
        except MlflowException:  # another stage created it in the meantime
            experiment = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # never overrides a kind someone chose in the UI
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def find_run(client, experiment: str, tags: dict[str, str]):
    """The newest run of `experiment` carrying all of `tags`, or None."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    found = client.search_runs([experiment], query, max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def find_or_create_run(client, experiment: str, tags: dict[str, str], run_name: str,
                       on_create: Callable[[str], None] | None = None) -> str:  # fmt: skip
    """The run carrying `tags` (found again on every rerun), else a new one with them; `on_create(run_id)`
    logs what only a new run needs (its params)."""
    found = find_run(client, experiment, tags)
    if found is not None:
        return found.info.run_id
    run = client.create_run(experiment, run_name=run_name, tags=tags)
    if on_create is not None:
        on_create(run.info.run_id)
    return run.info.run_id


@dataclass(frozen=True)
class StageTracking:
    """Where a stage logs: the URI, the experiment (None: the stage's own), the run name (None: the stage's
    command name) and the workflow run to nest under."""

    uri: str
    experiment: str | None = None
    run_name: str | None = None
    parent_run_id: str | None = None

    def tags(self, run_name: str) -> dict[str, str]:
        tags = {"mlflow.runName": run_name}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags


def log_stage_run(tracking: StageTracking, experiment: str, run_name: str, params: dict,
                  metrics: dict[str, float], artifacts: list[str], extra=None) -> str:  # fmt: skip
    """Log one finished stage as an MLflow run; returns its run id. `experiment` and `run_name` are the
    stage's defaults, which `tracking` may override. `extra(mlflow)`, if given, logs more (tables, images)
    inside the same run."""
    import mlflow

    mlflow.set_tracking_uri(tracking.uri)
    name = tracking.run_name or run_name
    experiment_name = tracking.experiment or experiment
    experiment_id(mlflow.MlflowClient(tracking.uri), experiment_name, tracking.uri)
    mlflow.set_experiment(experiment_name)
    with mlflow.start_run(run_name=name, tags=tracking.tags(name)) as run:
        mlflow.log_params({key: str(value)[:6000] for key, value in flatten(params).items()})
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(path)
        if extra is not None:
            extra(mlflow)
    return run.info.run_id
