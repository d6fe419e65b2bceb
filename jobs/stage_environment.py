"""The environment a stage gets, declared once: what every stage job and every Ray worker of a stage sees.

Two kinds of variables:

- fixed ones (`FIXED_ENVIRONMENT`), always set: no phoning home from inside a job (albumentations checks for
  updates at import, a network call that hangs where there is none; Ray's usage stats);
- pass-through ones (`PASS_THROUGH`), copied from the submitter's environment when set there: where MLflow is
  and how to log in to it, cloud credentials for s3:// and gs:// inputs and outputs, where weights come
  from. A cluster's nodes do not share the submitter's environment: without this, a stage's Ray workers
  would read and write object stores without credentials.

`SECRETS` names the pass-through variables whose values are credentials. They reach the stage, and nothing the
project writes shows them: `redact` masks their values (and a password inside a URI) in any text before it is
printed or recorded. Records, manifests and MLflow params hold options and configs, never the environment;
`tests/test_stage_environment.py` and `tests/test_object_store.py` check that no secret leaks into them. A
tracking URI with a password inside is refused (`refuse_password_in_uri`): it would be printed and passed on
command lines.

Ray itself keeps a job's environment in the job's runtime_env, which its dashboard shows to anyone who can
reach it: on a shared cluster give the nodes their own credentials (an IAM role, a Kubernetes secret) and
leave the secret variables unset where the workflow is submitted (docs/dependencies.md, "Object stores and
credentials").
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# Inherited by every Ray worker of a stage.
FIXED_ENVIRONMENT = {"NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}

PASS_THROUGH = (
    # MLflow: the server, its login (basic auth or a bearer token), TLS, and the S3 endpoint of its artifacts.
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_S3_ENDPOINT_URL",
    # S3 and S3-compatible stores (s3fs reads these through botocore).
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    # Google Cloud Storage (gcsfs): a service-account key file every node can read, and the project.
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    # Where weights come from: the Hugging Face hub (offline, its cache, a token for gated repos), torch's
    # hub cache, and the evaluation's local weights (infgen/metrics: Inception, the LPIPS trunk).
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "HF_TOKEN",
    "TORCH_HOME",
    "INFGEN_INCEPTION_WEIGHTS",
    "INFGEN_LPIPS_TRUNK",
    # How often a running stage reports its progress to MLflow (pipelines/common/tracking.py).
    "INFGEN_PROGRESS_INTERVAL_S",
)

# Set by the project where it submits a job, never taken from the submitter's environment.
SET_BY_SUBMISSION = ("INFGEN_WORKFLOW_TEXT",)  # a detached workflow's file (jobs/workflow/detached.py)

SECRETS = frozenset(
    {
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "HF_TOKEN",
    }
)

REDACTED = "***"

# scheme://user:password@host → the password; what an MLflow or endpoint URI may carry.
_URI_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*:)(?P<password>[^/@\s]+)(?=@)")


def stage_environment(environ: Mapping[str, str] | None = None, tracking_uri: str | None = None) -> dict:
    """What a stage's job and workers get: the fixed variables, every pass-through variable set (and not
    empty) in `environ` (default: this process's environment), and MLFLOW_TRACKING_URI = `tracking_uri` when
    given (a workflow's own URI wins over the submitter's variable)."""
    environ = os.environ if environ is None else environ
    environment = dict(FIXED_ENVIRONMENT)
    environment.update({name: environ[name] for name in PASS_THROUGH if environ.get(name)})
    if tracking_uri:
        environment["MLFLOW_TRACKING_URI"] = tracking_uri
    return environment


def _without_passwords(text: str) -> str:
    return _URI_PASSWORD.sub(lambda match: match.group("head") + REDACTED, text)


def refuse_password_in_uri(uri: str, where: str) -> str:
    """`uri`, unless it carries a password (scheme://user:password@host): a tracking URI is printed, passed on
    command lines and shown in Ray's job list, so the password goes in MLFLOW_TRACKING_PASSWORD (or a token in
    MLFLOW_TRACKING_TOKEN) instead. `where` names the setting in the error."""
    if _URI_PASSWORD.search(uri):
        raise ValueError(
            f"{where} {_without_passwords(uri)} holds a password: "
            "give the URI without it and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN); those reach every stage and are never printed or recorded"
        )
    return uri


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values to hide: every secret variable set in `environ`, and passwords inside pass-through URIs.
    Longest first, so a value that contains another is hidden whole."""
    environ = os.environ if environ is None else environ
    values = {environ[name] for name in SECRETS if environ.get(name)}
    for name in PASS_THROUGH:
        values.update(match.group("password") for match in _URI_PASSWORD.finditer(environ.get(name) or ""))
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with every secret value of `environ` and every password inside a URI replaced by ***."""
    for value in secret_values(environ):
        text = text.replace(value, REDACTED)
    return _without_passwords(text)


def shown(environment: Mapping[str, str]) -> dict:
    """`environment` as it may be printed or recorded: secret variables' values masked, URI passwords too."""
    return {
        name: REDACTED if name in SECRETS else redact(value, environment)
        for name, value in sorted(environment.items())
    }
