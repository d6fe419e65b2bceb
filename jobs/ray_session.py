"""Connect a job to Ray: the cluster at --ray-address / RAY_ADDRESS, else an embedded local one."""

from __future__ import annotations

import logging
import os

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
    # The dashboard needs extra packages and ports; jobs on a cluster use the cluster's own.
    ray.init(
        address=address,
        include_dashboard=False,
        # Inside a Ray job the job's runtime_env already carries these, and Ray refuses to merge a second one.
        runtime_env={"env_vars": OFFLINE_ENVIRONMENT} if address and not inside_ray_job else None,
    )
    # Ray Data logs every dataset's plan at INFO; the stages print their own one-line progress instead.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    where = address or "an embedded local cluster"
    print(f"ray: connected to {where} ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)")
