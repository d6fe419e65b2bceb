"""MLflow for every stage and the workflow: where runs go, finding them again by tag, one run per stage.

The tracking URI comes from the caller (the CLI's --tracking-uri or the workflow file), else
MLFLOW_TRACKING_URI, else a SQLite file under runs/: never a local `mlruns` folder, which MLflow ≥ 3.13
refuses (docs/dependencies.md, "MLflow"). Runs are found again by tags, so a resumed stage or a rerun
workflow logs into the run it started instead of a new one.

Live runs: a stage command's run is opened when the stage starts (`live_stage_run`, RUNNING, so it shows in
the UI at once), takes progress metrics while the stage runs (`report_progress`: "progress.*", at most once
per PROGRESS_INTERVAL_S, the last values always), and ends FINISHED, FAILED or KILLED (Ctrl-C, or SIGTERM,
which jobs/cli.py turns into Ctrl-C) with the error text as the `infgen.error` tag. A stage's run is found
again by its name, its output and its workflow run while it has not finished, so a resumed stage continues
the run it started (and a workflow can open it before it submits the stage as a Ray job); a finished stage
run again gets a new run.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# How often a stage's progress metrics reach MLflow at most (a stage may report per row).
PROGRESS_INTERVAL_S = float(os.environ.get("INFGEN_PROGRESS_INTERVAL_S", "15"))
ERROR_TAG = "infgen.error"
ERROR_TAG_LIMIT = 5000  # characters: MLflow's tag values are bounded (8000 in MLflow 3)


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


def find_run(client, experiment: str, tags: dict[str, str], unfinished: bool = False):
    """The newest run of `experiment` carrying all of `tags` (`unfinished`: and not FINISHED), or None."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    if unfinished:
        query += " and attributes.status != 'FINISHED'"
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


def stage_run_tags(tracking: StageTracking, run_name: str, output: str) -> dict[str, str]:
    """What finds a stage's run again: its name, where it writes, its workflow's run (if any)."""
    return {"infgen.run_name": run_name, "infgen.output": output.rstrip("/"), **tracking.tags(run_name)}


def open_stage_run(tracking: StageTracking, experiment: str, run_name: str, output: str) -> str:
    """The stage's unfinished run (a resumed stage's, or the one its workflow opened), else a new one; marked
    RUNNING. `experiment` and `run_name` are the stage's defaults, which `tracking` may override."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking.uri)
    name = tracking.run_name or run_name
    experiment = experiment_id(client, tracking.experiment or experiment, tracking.uri)
    tags = stage_run_tags(tracking, name, output)
    found = find_run(client, experiment, tags, unfinished=True)
    if found is None:
        return client.create_run(experiment, run_name=name, tags=tags).info.run_id  # RUNNING
    run_id = found.info.run_id
    client.update_run(run_id, status="RUNNING")
    if ERROR_TAG in found.data.tags:  # the error of the try this one resumes
        client.delete_tag(run_id, ERROR_TAG)
    return run_id


class LiveRun:
    """An open stage run: progress metrics at a bounded rate, and its end."""

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(uri)
        self.pending: dict[str, float] = {}
        self.last_logged = 0.0
        self.reports = 0
        self.lock = threading.Lock()  # stages may report from a watcher thread

    def progress(self, metrics: dict[str, float], force: bool = False) -> None:
        with self.lock:
            self.pending.update({f"progress.{name}": float(value) for name, value in metrics.items()})
            if force or time.monotonic() - self.last_logged >= PROGRESS_INTERVAL_S:
                self._flush()

    def _flush(self) -> None:
        from mlflow.entities import Metric

        if not self.pending:
            return
        timestamp = int(1000 * time.time())
        batch = [Metric(name, value, timestamp, self.reports) for name, value in self.pending.items()]
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as error:  # progress is worth a line, never the stage
            print(f"mlflow: could not log progress to run {self.run_id}: {type(error).__name__}: {error}")
        self.pending, self.last_logged, self.reports = {}, time.monotonic(), self.reports + 1

    def end(self, status: str, error: str | None = None) -> None:
        with self.lock:
            self._flush()
        if error:
            self.client.set_tag(self.run_id, ERROR_TAG, error[-ERROR_TAG_LIMIT:])
        self.client.set_terminated(self.run_id, status=status)


_live: LiveRun | None = None


def report_progress(metrics: dict[str, float], force: bool = False) -> None:
    """Log a stage's progress (e.g. {"shards_done": 3}) on its open run as progress.<name>: at most once per
    PROGRESS_INTERVAL_S, unless `force`; values held back meanwhile go out with the next one or at the end.
    Nothing happens when no run is open (a stage function called without a command around it)."""
    if _live is not None:
        _live.progress(metrics, force)


def live_run() -> LiveRun | None:
    return _live


@contextlib.contextmanager
def live_stage_run(tracking: StageTracking, experiment: str, run_name: str, output: str,
                   redact: Callable[[str], str] = str):  # fmt: skip
    """The stage's run, open (RUNNING) for the `with` block and ended with its outcome: FINISHED; KILLED on
    KeyboardInterrupt (Ctrl-C, SIGTERM); FAILED on any other error, whose text (through `redact`, which
    masks credentials) becomes the `infgen.error` tag. Yields the LiveRun; `report_progress` and
    `log_stage_run` log into it meanwhile."""
    global _live
    run = LiveRun(tracking.uri, open_stage_run(tracking, experiment, run_name, output))
    previous, _live = _live, run
    try:
        yield run
    except KeyboardInterrupt:
        _end_quietly(run, "KILLED", "interrupted: Ctrl-C or SIGTERM (a stopped Ray job)")
        raise
    except BaseException as error:
        text = f"{type(error).__name__}: {getattr(error, 'cause', None) or error}"
        _end_quietly(run, "FAILED", redact(text))
        raise
    else:
        run.end("FINISHED")
    finally:
        _live = previous


def _end_quietly(run: LiveRun, status: str, error: str) -> None:
    """End a run whose stage failed; an MLflow error here must not hide the stage's own."""
    try:
        run.end(status, error)
    except Exception as problem:
        print(f"mlflow: could not mark run {run.run_id} {status}: {type(problem).__name__}: {problem}")


def log_stage_run(tracking: StageTracking, experiment: str, run_name: str, params: dict,
                  metrics: dict[str, float], artifacts: list[str], extra=None) -> str:  # fmt: skip
    """Log one finished stage in its MLflow run (the open one, else a new one); returns its run id.
    `experiment` and `run_name` are the stage's defaults, which `tracking` may override. `extra(mlflow)`, if
    given, logs more (tables, images) inside the same run."""
    import mlflow

    mlflow.set_tracking_uri(tracking.uri)
    name = tracking.run_name or run_name
    experiment_name = tracking.experiment or experiment
    experiment_id(mlflow.MlflowClient(tracking.uri), experiment_name, tracking.uri)
    mlflow.set_experiment(experiment_name)
    if _live is not None and _live.uri == tracking.uri:
        opened = mlflow.start_run(run_id=_live.run_id)
    else:
        opened = mlflow.start_run(run_name=name, tags=tracking.tags(name))
    with opened as run:
        mlflow.log_params({key: str(value)[:6000] for key, value in flatten(params).items()})
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(path)
        if extra is not None:
            extra(mlflow)
    return run.info.run_id
