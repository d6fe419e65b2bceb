"""The MLflow server of infra/mlflow, for real: `mlflow server --app-name basic-auth` with the shipped
basic_auth.ini (only its user store moved to a temporary SQLite file), the admin's password from the
environment as the deployment's secret gives it, a SQLite backend store and artifacts served through the
server, on 127.0.0.1. An unauthenticated or wrongly authenticated client is refused, a Host header outside
--allowed-hosts is refused, and the pipeline's user, created by the admin, runs a real stage (`infgen
photos`) that logs its run and uploads its manifest through the server."""

from __future__ import annotations

import configparser
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[1]
AUTH_CONFIG = REPOSITORY / "infra" / "mlflow" / "basic_auth.ini"
ADMIN = ("admin", "admin-password-from-the-secret")
PIPELINE = ("pipeline", "pipeline-password-of-the-stages")
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
START_DEADLINE_S = 240  # MLflow's server stack is imported twice (CLI, worker): 30 s on 2 idle cores, 80 busy


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def _wait_until_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode} while starting:\n{_log_tail(log)}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or too busy starting to answer in time
            pass
        time.sleep(0.25)  # polling interval, not synchronisation: the loop ends on the server's answer
    pytest.fail(f"mlflow server did not answer /health within {START_DEADLINE_S} s:\n{_log_tail(log)}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_auth")
    config = configparser.ConfigParser()
    config.read(AUTH_CONFIG)
    assert "admin_password" not in config["mlflow"], "the admin's password must come from a secret"
    config["mlflow"]["database_uri"] = f"sqlite:///{root / 'basic_auth.db'}"
    with open(root / "basic_auth.ini", "w") as file:
        config.write(file)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    environment = {name: value for name, value in os.environ.items() if name not in CREDENTIAL_VARIABLES}
    environment.update(
        MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"),
        MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1],
        MLFLOW_FLASK_SERVER_SECRET_KEY="csrf-signing-key-of-the-test",
    )
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--allowed-hosts", f"127.0.0.1:{port},mlflow.infgen.svc:5000",
    ]  # fmt: skip
    log = root / "server.log"
    with open(log, "w") as output:
        # Its own process group: the server's workers end with it, and nothing else is signalled.
        process = subprocess.Popen(command, cwd=root, env=environment, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        _wait_until_healthy(url, process, log)
        yield {"url": url, "root": root, "port": port, "log": log}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def signed_in(monkeypatch):
    """Sign in as (user, password) for MLflow's clients, which read the credentials from the environment."""

    def sign_in(user: str, password: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return sign_in


SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def test_a_client_without_credentials_is_refused(server, signed_in):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    answer = requests.get(server["url"] + SEARCH, timeout=30)
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Basic")
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(server["url"]).search_experiments()


def test_a_wrong_password_is_refused_and_the_admin_password_from_the_environment_is_accepted(server):
    wrong = requests.get(server["url"] + SEARCH, auth=(ADMIN[0], "not-the-password"), timeout=60)
    assert wrong.status_code == 401
    right = requests.get(server["url"] + SEARCH, auth=ADMIN, timeout=60)
    assert right.status_code == 200, right.text


def test_a_host_header_outside_allowed_hosts_is_refused(server):
    foreign = {"Host": f"mlflow.example.com:{server['port']}"}
    assert requests.get(server["url"] + SEARCH, auth=ADMIN, headers=foreign, timeout=60).status_code == 403
    # Kubernetes probes /health by the pod's IP: it is exempt from the host check and needs no login.
    assert requests.get(server["url"] + "/health", headers=foreign, timeout=30).status_code == 200


def test_the_pipeline_user_logs_a_stage_run_and_its_artifact_through_the_server(server, signed_in, tmp_path):
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    from jobs.cli import run_arguments

    signed_in(*ADMIN)
    users = get_app_client("basic-auth", tracking_uri=server["url"])
    assert users.create_user(*PIPELINE).is_admin is False
    signed_in(*PIPELINE)
    output = tmp_path / "photos"
    manifest = run_arguments(["photos", "--output", str(output), "--tracking-uri", server["url"]])
    assert manifest["status"] == "complete"

    client = MlflowClient(server["url"])
    experiment = client.get_experiment_by_name("infgen-photos")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's proxy, not a path
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics and run.data.params
    signed_in(*ADMIN)  # the pipeline's user created the experiment, so it manages it (others only READ it)
    permission = users.get_user_permission(PIPELINE[0], "experiment", experiment.experiment_id)
    assert permission.permission == "MANAGE"
    signed_in(*PIPELINE)
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert "manifest.json" in logged
    # Uploaded through the server into its artifact destination: the client never wrote there itself.
    stored = list((server["root"] / "artifacts").rglob("manifest.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text()) == manifest
