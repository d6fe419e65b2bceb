"""Connect a job to Ray: the cluster at --ray-address / RAY_ADDRESS, else an embedded local one."""

from __future__ import annotations

import logging
import os
import sys

# Inherited by the Ray workers this driver starts: no phoning home from inside a job (albumentations checks
# for updates on import; that is a network call, and it hangs where there is no network).
OFFLINE_ENVIRONMENT = {"NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def connect_ray(address: str | None = None) -> None:
    import ray

    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    inside_ray_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
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
        # Inside a Ray job the job's runtime_env already carries these, and Ray refuses to merge a second one.
        runtime_env={"env_vars": OFFLINE_ENVIRONMENT} if address and not inside_ray_job else None,
        **local,
    )
    # Ray Data logs every dataset's plan at INFO, and without a terminal its progress bars become a block of
    # log lines every few seconds (hundreds per stage in a job log); the stages print their own one-line
    # progress instead. On a terminal the bars stay.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    where = address or "an embedded local cluster"
    shown = address is None and context.dashboard_url
    dashboard = f", dashboard http://{context.dashboard_url}" if shown else ""
    print(f"ray: connected to {where} ({ray.cluster_resources().get('CPU', 0):.0f} CPUs{dashboard})")
