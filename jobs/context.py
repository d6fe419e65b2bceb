"""Where a stage command runs and logs: the options every stage command takes besides its own.

A workflow sets these itself (its tracking URI, its MLflow run as the parent, the stage's name as the run
name); on the command line they default to RAY_ADDRESS / MLFLOW_TRACKING_URI, else an embedded Ray and a
SQLite file under runs/.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.options import option


@dataclass(frozen=True, kw_only=True)
class RunContext:
    ray_address: str | None = option(None, help="Ray cluster to use (default: RAY_ADDRESS, else embedded)")
    tracking_uri: str | None = option(
        None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or runs/mlflow.db)"
    )
    parent_run_id: str | None = option(None, help="MLflow run to nest this stage's run under")
    run_name: str | None = option(None, help="MLflow run name (default: the stage's command name)")
    experiment: str | None = option(
        None, help="MLflow experiment (default: the stage's own; a workflow passes its own)"
    )

    def tracking(self):
        """The stage's MLflow settings (pipelines.common.tracking.StageTracking)."""
        from jobs.stage_environment import refuse_password_in_uri
        from pipelines.common.tracking import StageTracking, default_tracking_uri

        where = "--tracking-uri" if self.tracking_uri else "MLFLOW_TRACKING_URI"
        uri = refuse_password_in_uri(self.tracking_uri or default_tracking_uri(), where)
        return StageTracking(uri, self.experiment, self.run_name, self.parent_run_id)

    def connect_ray(self) -> None:
        from jobs.ray_session import connect_ray

        connect_ray(self.ray_address)
