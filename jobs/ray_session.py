"""Connect a job to Ray: the cluster at --ray-address / RAY_ADDRESS, else an embedded local one."""

from __future__ import annotations

import logging
import os
import sys

from jobs.stage_environment import FIXED_ENVIRONMENT, stage_environment
from pipelines.common.ray_job import JOB_CONFIG_VARIABLE

# Inherited by the Ray workers this driver starts: no phoning home from a job (jobs/stage_environment.py).
OFFLINE_ENVIRONMENT = FIXED_ENVIRONMENT


def connect_ray(address: str | None = None) -> None:
    import ray

    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    inside_ray_job = JOB_CONFIG_VARIABLE in os.environ
    if address is None:
        # An embedded cluster lives and dies with this process, on this machine: token auth only gets in the
        # way of its own workers (environment.md). Clusters keep whatever their operators chose.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # An embedded cluster gets a dashboard on 127.0.0.1: Ray's State API lives there, and without it Ray
    # Train's placement-group cleaner cannot see its controller (it warns every few seconds and could leak
    # the workers' placement group); users get the dashboard's progress views. A cluster has its own.
    local = {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if address is None else {}
    context = ray.init(
        address=address,
        # A cluster's workers do not inherit this process's environment: they get the stage's (credentials for
        # object stores and MLflow included). Inside a Ray job the job's runtime_env already carries it (the
        # submitter's), and Ray refuses to merge a second one. An embedded cluster's workers inherit ours.
        runtime_env={"env_vars": stage_environment()} if address and not inside_ray_job else None,
        **local,
    )
    # Ray Data logs every dataset's plan at INFO: kept out. On a terminal its progress bars stay. Without one
    # (a Ray job's log) Ray 2.60 logs progress instead of drawing bars (ray.data._internal.progress.
    # logging_progress), as a block of lines per operator every RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL s:
    # only its total line is kept, once per interval (30 s unless set), beside the stages' own lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    terminal = sys.stdout.isatty()
    if not terminal:
        os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "30")  # read when Ray Data logs
        progress_log = logging.getLogger("ray.data._internal.progress.logging_progress")
        progress_log.setLevel(logging.INFO)
        progress_log.addFilter(lambda record: record.getMessage().startswith("Total Progress"))
    import ray.data

    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = True
    data_context.enable_operator_progress_bars = terminal
    where = address or "an embedded local cluster"
    shown = address is None and context.dashboard_url
    dashboard = f", dashboard http://{context.dashboard_url}" if shown else ""
    print(f"ray: connected to {where} ({ray.cluster_resources().get('CPU', 0):.0f} CPUs{dashboard})")
