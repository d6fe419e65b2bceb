"""jobs.ray_jobs against a real Ray cluster started with `ray start --head` (the Job Submission SDK).

The cluster is this module's own, one node with its own --temp-dir and ports (tests/ray_cluster.py: how it
is started and stopped without touching any other Ray on the machine). The orchestrator killed while a stage
job runs, and a lost node: tests/test_multinode.py.
"""

from __future__ import annotations

import http.server
import io
import os
import shlex
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from ray_cluster import LocalCluster, free_port

from jobs import ray_jobs

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[1]
POLL_S = 0.25  # how often the tests' submissions check the job's status (default 1 s)


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster (1 CPU) on 127.0.0.1: {"dashboard": its dashboard's URL, "gcs": HOST:PORT}."""
    started = LocalCluster(head_cpus=1).start()
    try:
        yield {"dashboard": started.dashboard, "gcs": started.gcs}
    finally:
        started.stop()


@pytest.fixture
def dashboard(cluster):
    return cluster["dashboard"]


def _python(code: str) -> str:
    return shlex.join(["python", "-c", code])


def test_command_runs_in_uploaded_working_dir_with_env_vars(dashboard, tmp_path, monkeypatch):
    (tmp_path / "marker.txt").write_text("content of the marker file")
    for excluded in (".venv/lib/big.bin", "runs/demo/out.txt", "shard.parquet"):
        (tmp_path / excluded).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / excluded).write_text("must not be uploaded")
    code = (
        "import os; print('marker=' + open('marker.txt').read());"
        "print('value=' + os.environ['INFGEN_TEST_VALUE']);"
        "print('offline=' + os.environ['NO_ALBUMENTATIONS_UPDATE']);"
        "print('uploaded=' + repr([p for p in ('.venv', 'runs', 'shard.parquet') if os.path.exists(p)]))"
    )
    # Ray's own client would let this variable override the explicit address; ours must not.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    output = io.StringIO()
    result = ray_jobs.submit_command(
        dashboard,
        _python(code),
        working_dir=tmp_path,
        env_vars={"INFGEN_TEST_VALUE": "value from the submitter"},
        submission_id="infgen-test-success",
        output=output,
        poll_interval=POLL_S,
    )
    streamed = output.getvalue()
    assert result["status"] == "SUCCEEDED" and result["driver_exit_code"] == 0
    assert result["submission_id"] == "infgen-test-success" and result["address"] == dashboard
    assert "ray job logs --address " + dashboard + " --follow infgen-test-success" in streamed
    for line in ("marker=content of the marker file", "value=value from the submitter", "offline=1",
                 "uploaded=[]"):  # fmt: skip
        assert streamed.count(line + "\n") == 1, (line, streamed)  # streamed once, not twice


def test_stage_runs_the_cli_from_the_repository_and_a_driver_can_connect(dashboard):
    output = io.StringIO()
    result = ray_jobs.submit_stage(
        dashboard, ["--help"], working_dir=REPOSITORY, output=output, poll_interval=POLL_S
    )
    assert result["status"] == "SUCCEEDED"
    assert result["submission_id"].startswith("infgen-help-")
    assert result["entrypoint"] == "python -m jobs.cli --help"
    assert "usage: infgen" in output.getvalue() and "ingest" in output.getvalue()

    # A stage's driver inside the job connects with jobs.ray_session.connect_ray, which passes the offline
    # env vars to ray.init again: without RAY_OVERRIDE_JOB_RUNTIME_ENV=1 Ray refuses that as a conflict with
    # the job's runtime_env. Its tasks run in the uploaded copy of the repository.
    code = (
        "import os, ray; from jobs.ray_session import connect_ray; connect_ray();"
        "where = ray.get(ray.remote(lambda: __import__('pipelines').__file__).remote());"
        "print('worker-imports-from-upload=' + str(where.startswith(os.getcwd()) and os.getcwd() != "
        + repr(str(REPOSITORY))
        + "))"
    )
    output = io.StringIO()
    result = ray_jobs.submit_command(
        dashboard, _python(code), working_dir=REPOSITORY, output=output, poll_interval=POLL_S
    )
    assert "worker-imports-from-upload=True\n" in output.getvalue(), output.getvalue()


def test_failed_job_raises_with_status_message_and_exactly_the_log_tail(dashboard, tmp_path):
    code = "import sys\nfor i in range(1, 101): print(f'line {i:03d}')\nsys.exit(3)"
    output = io.StringIO()
    with pytest.raises(ray_jobs.JobFailed) as caught:
        ray_jobs.submit_command(
            dashboard,
            _python(code),
            working_dir=tmp_path,
            output=output,
            log_tail_lines=7,
            poll_interval=POLL_S,
        )
    error = caught.value
    assert error.status == "FAILED" and error.driver_exit_code == 3
    assert error.log_tail == "\n".join(f"line {i:03d}" for i in range(94, 101)), repr(error.log_tail)
    text = str(error)
    assert "FAILED" in text and "exit code 3" in text and error.submission_id in text
    assert "line 094" in text and "line 100" in text
    assert "line 093" not in text and "line 001" not in text  # Ray's message repeats 10 lines: cut
    assert "line 001\n" in output.getvalue() and "line 100\n" in output.getvalue()  # the whole log streamed


def test_ctrl_c_while_waiting_stops_the_job(dashboard, tmp_path):
    code = "import time\nfor i in range(200):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.1)"

    class InterruptOnThirdTick(io.StringIO):
        def write(self, text):
            written = super().write(text)
            if "tick 3\n" in self.getvalue() and not getattr(self, "sent", False):
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
            return written

    output = InterruptOnThirdTick()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ray_jobs.submit_command(
            dashboard,
            _python(code),
            working_dir=tmp_path,
            submission_id="infgen-test-ctrl-c",
            output=output,
            poll_interval=POLL_S,
        )
    assert time.monotonic() - started < 15  # did not wait for the 20 s job
    assert "interrupted; stopped infgen-test-ctrl-c" in output.getvalue()
    client = ray_jobs.connect(dashboard)
    deadline = time.monotonic() + 20
    while str(status := client.get_job_status("infgen-test-ctrl-c")) != "STOPPED":
        assert time.monotonic() < deadline, f"job still {status} after stop"
        time.sleep(0.2)
    assert "tick 199" not in client.get_job_logs("infgen-test-ctrl-c")


def test_unreachable_address_fails_fast_naming_it(tmp_path):
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=refused.replace(".", r"\.")):
        ray_jobs.submit_command(refused, "true", working_dir=tmp_path)
    assert time.monotonic() - started < 5

    # A listener that never answers (what a firewalled or wedged head looks like): the timeout bounds it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"  # no scheme: http:// is implied
        started = time.monotonic()
        with pytest.raises(ConnectionError, match=rf"http://{address}.*within 1 s"):
            ray_jobs.submit_command(address, "true", working_dir=tmp_path, connect_timeout=1)
        assert time.monotonic() - started < 5


def test_address_that_is_not_a_dashboard_is_refused_naming_it(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ValueError, match=rf"{url}.*not a Ray dashboard"):
            ray_jobs.submit_command(url, "true", working_dir=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match=r"ray://head:10001 is a Ray Client address.*http://head:8265"):
        ray_jobs.connect("ray://head:10001")


def test_a_gcs_address_is_mapped_to_its_dashboard(cluster):
    # What `ray.init`, --ray-address and, inside a Ray job, RAY_ADDRESS hold: the cluster's GCS says where
    # its dashboard is.
    assert ray_jobs.connect(cluster["gcs"], timeout=5).get_address() == cluster["dashboard"]


def test_dashboard_address_prefers_the_argument_then_the_api_server_variable(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_jobs.dashboard_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "http://from-ray-address:8265")
    assert ray_jobs.dashboard_address(None) == "http://from-ray-address:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://from-api-server:8265")
    assert ray_jobs.dashboard_address(None) == "http://from-api-server:8265"
    assert ray_jobs.dashboard_address(" http://given:8265 ") == "http://given:8265"


def test_a_workflow_stage_runs_as_a_ray_job_and_is_skipped_on_rerun(dashboard, tmp_path, capsys):
    """`infgen run WORKFLOW --address`: the stage is a Ray job on the cluster, recorded like a local one."""
    import json

    import yaml
    from mlflow import MlflowClient

    from jobs.workflow import run_workflow

    workflow = tmp_path / "one-stage.yaml"
    stage = {"name": "ingest", "command": "ingest", "options": {"embedded": 12, "samples-per-shard": 6}}
    workflow.write_text(yaml.safe_dump({"name": "jobs-test", "run_dir": str(tmp_path / "run"),
                                        "experiment": "jobs-test", "stages": [stage]}))  # fmt: skip
    summary = run_workflow(str(workflow), address=dashboard)
    assert summary["stages"] == {"ingest": "ran"}
    streamed = capsys.readouterr().out
    assert "ray: connected to" in streamed and "ingest: download:" in streamed  # the job's log, streamed here
    record = json.loads((tmp_path / "run" / "workflow" / "ingest.json").read_text())
    manifest = json.loads((tmp_path / "run" / "ingest" / "manifest.json").read_text())
    assert record["status"] == "complete" and manifest["counts"]["input_rows"] == 12
    # the job logged to the tracking URI the workflow gave it
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (child,) = client.search_runs([client.get_experiment_by_name("jobs-test").experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")  # fmt: skip
    assert child.info.run_name == "ingest" and record["mlflow_run_id"] == child.info.run_id
    assert run_workflow(str(workflow), address=dashboard)["stages"] == {"ingest": "skipped"}


# --- the orchestrator on the cluster -------------------------------------------------------------------
def _write_workflow(tmp_path: Path, name: str, stages: list[dict]) -> Path:
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "run_dir": str(tmp_path / "run"), "experiment": name,
                                    "stages": stages}))  # fmt: skip
    return path


def _mlflow_runs(run_dir: Path, experiment: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {run.info.run_name: run for run in runs}


def test_a_detached_workflow_runs_its_stages_as_jobs_and_status_follows_it(dashboard, tmp_path, capsys):
    """`infgen run --detach`: the orchestrator is a Ray job; inside it RAY_ADDRESS (the GCS) leads to the
    dashboard, and each stage becomes a job of its own. A stage that fails has its MLflow run FAILED with the
    error, opened before the stage ran; `infgen status` and `infgen logs` tell it from the records and Ray."""
    from jobs.cli import run_arguments

    broken = {"name": "broken", "command": "latents", "options": {"images": "{photos}"}}  # PNGs, no shards
    workflow = _write_workflow(tmp_path, "detached", [{"name": "photos", "command": "photos"}, broken])
    run_dir = tmp_path / "run"
    submitted = run_arguments(["run", str(workflow), "--address", dashboard, "--detach"])
    assert submitted["run_dir"] == str(run_dir) and submitted["address"] == dashboard
    deadline = time.monotonic() + 240
    finished = ("SUCCEEDED", "FAILED", "STOPPED")
    while (status := run_arguments(["status", str(run_dir), "--address", dashboard]))["orchestrator_job"] \
            not in finished:  # fmt: skip
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status["orchestrator"] == submitted["submission_id"] and status["orchestrator_job"] == "FAILED"
    assert status["status"] == "failed"
    photos, failed = status["stages"]["photos"], status["stages"]["broken"]
    assert photos["state"] == "complete" and photos["job_status"] == "SUCCEEDED"
    assert failed["state"] == "failed" and failed["job_status"] == "FAILED"
    assert (
        failed["job"].startswith("infgen-detached-broken-") and "holds no *.parquet files" in failed["tail"]
    )
    assert "photographs 4" in photos["progress"] or photos["mlflow_status"] == "FINISHED"
    runs = _mlflow_runs(run_dir, "detached")
    assert runs["photos"].info.status == "FINISHED" and runs["detached"].info.status == "FAILED"
    assert runs["broken"].info.status == "FAILED"
    assert "holds no *.parquet files" in runs["broken"].data.tags["infgen.error"]
    assert runs["broken"].info.run_id == failed["mlflow_run_id"]
    capsys.readouterr()
    assert run_arguments(["logs", str(run_dir), "broken"]) == failed["job"]
    assert "holds no *.parquet files" in capsys.readouterr().out
    assert run_arguments(["stop", str(run_dir)]) == []  # nothing left running
    # Where the run directory is not readable here (a volume only the cluster mounts), the same state is read
    # by a Ray job on the cluster.
    from jobs.workflow.state import load_state, load_state_on_cluster

    assert load_state_on_cluster(dashboard, str(run_dir)) == load_state(str(run_dir))
