"""The stage environment (jobs/stage_environment.py): what passes to a stage's job and workers, and that the
secrets among it are hidden wherever the project shows an environment or a URI. The end-to-end proof that
Ray workers receive credentials and that nothing records them is tests/test_object_store.py."""

import re
from pathlib import Path

import pytest

from jobs.ray_session import OFFLINE_ENVIRONMENT
from jobs.stage_environment import (
    FIXED_ENVIRONMENT,
    PASS_THROUGH,
    REDACTED,
    SECRETS,
    SET_BY_SUBMISSION,
    redact,
    secret_values,
    shown,
    stage_environment,
)

SUBMITTER = {
    "MLFLOW_TRACKING_URI": "https://mlflow.example:5000",
    "MLFLOW_TRACKING_USERNAME": "infgen",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-password-7f3a",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-91c2",
    "AWS_ENDPOINT_URL": "http://minio:9000",
    "HF_HUB_OFFLINE": "1",
    "AWS_SESSION_TOKEN": "",  # set but empty: not passed
    "HOME": "/home/someone",  # not declared: never passed
    "OTHER_TOKEN": "not-ours",
}


def test_declared_variables_pass_through_when_set_and_nothing_else_does():
    environment = stage_environment(SUBMITTER)
    passed = {name: value for name, value in SUBMITTER.items() if name in PASS_THROUGH and value}
    assert environment == {**FIXED_ENVIRONMENT, **passed}
    assert "HOME" not in environment and "OTHER_TOKEN" not in environment
    assert "AWS_SESSION_TOKEN" not in environment


def test_the_workflow_tracking_uri_wins_over_the_submitters():
    environment = stage_environment(SUBMITTER, tracking_uri="http://mlflow.infgen.svc:5000")
    assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow.infgen.svc:5000"
    assert stage_environment({})["NO_ALBUMENTATIONS_UPDATE"] == "1"  # the fixed ones always


def test_the_offline_flags_ray_sessions_use_are_the_fixed_ones():
    assert OFFLINE_ENVIRONMENT == FIXED_ENVIRONMENT


def test_secrets_are_pass_through_variables():
    assert SECRETS <= set(PASS_THROUGH)
    assert {"MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY"} <= SECRETS


def test_every_infgen_variable_the_code_reads_is_declared():
    # A new INFGEN_* setting that workers would not see fails here, not on a cluster.
    root = Path(__file__).resolve().parents[1]
    read = set()
    for folder in ("infgen", "pipelines", "jobs"):
        for path in (root / folder).rglob("*.py"):
            read |= set(re.findall(r"[\"'](INFGEN_[A-Z0-9_]+)[\"']", path.read_text()))
    assert read, "the weights variables (INFGEN_INCEPTION_WEIGHTS...) were not found in the code"
    declared = {*PASS_THROUGH, *SET_BY_SUBMISSION}
    assert read <= declared, f"not declared in jobs/stage_environment.py: {sorted(read - declared)}"


def test_redact_hides_secret_values_and_uri_passwords():
    text = (
        "login mlflow-password-7f3a; key aws-secret-91c2; id AKIAEXAMPLE; "
        "uri https://infgen:s3cr3t@mlflow.example/api and s3://bucket/run"
    )
    redacted = redact(text, SUBMITTER)
    for secret in ("mlflow-password-7f3a", "aws-secret-91c2", "s3cr3t"):
        assert secret not in redacted
    assert "id AKIAEXAMPLE" in redacted  # an access key id names the key; it is not the secret
    assert f"https://infgen:{REDACTED}@mlflow.example/api" in redacted
    assert "s3://bucket/run" in redacted


def test_a_password_inside_a_pass_through_uri_is_a_secret_too():
    environ = {"MLFLOW_TRACKING_URI": "https://infgen:hunter2-long@mlflow.example"}
    assert secret_values(environ) == ["hunter2-long"]
    assert "hunter2-long" not in redact("connected (password hunter2-long)", environ)


def test_shown_masks_secret_variables_and_keeps_the_rest():
    displayed = shown(stage_environment(SUBMITTER))
    assert displayed["AWS_SECRET_ACCESS_KEY"] == displayed["MLFLOW_TRACKING_PASSWORD"] == REDACTED
    assert displayed["MLFLOW_TRACKING_USERNAME"] == "infgen"
    assert displayed["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert not any(value in str(displayed) for value in secret_values(SUBMITTER))


def test_a_tracking_uri_with_a_password_is_refused_before_a_stage_runs():
    from jobs.context import RunContext

    with pytest.raises(
        ValueError, match=r"--tracking-uri https://infgen:\*\*\*@mlflow.example holds a pass"
    ) as refused:
        RunContext(tracking_uri="https://infgen:hunter2-long@mlflow.example").tracking()
    assert "hunter2-long" not in str(refused.value) and "MLFLOW_TRACKING_PASSWORD" in str(refused.value)
    uri = "http://mlflow.infgen.svc:5000"
    assert RunContext(tracking_uri=uri).tracking().uri == uri
