"""Which Ray job this process is the driver of, if any: Ray hands a job's driver its config (with the
submission id among its metadata) in an environment variable. Locks and workflow records name the job, so a
person can stop it (`ray job stop ID`, `infgen stop`)."""

from __future__ import annotations

import json
import os

JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def own_submission_id() -> str | None:
    """This process's Ray job submission id, when it is a Ray job's driver."""
    config = os.environ.get(JOB_CONFIG_VARIABLE)
    if not config:
        return None
    try:
        return (json.loads(config).get("metadata") or {}).get("job_submission_id")
    except (json.JSONDecodeError, AttributeError):
        return None
