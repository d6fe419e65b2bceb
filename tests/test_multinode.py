"""Faults at cluster scale, on a real multi-node Ray cluster on this machine (tests/ray_cluster.py): a head
and two worker nodes, each its own `ray start` with its own CPU and a resource of its own name.

A reduced workflow (stage 1 on the session's latents) runs through `infgen run --address` and meets two
faults a cluster's users meet, one after the other, in the same stage job:
- its orchestrator is SIGKILLed while the stage runs as a Ray job; the rerun must follow that job
  (reattach), not submit the stage a second time into the same output;
- once Ray Train has registered stage 1's first checkpoint, the worker node that hosts a training worker is
  SIGKILLed (raylet and every process it started: a lost machine); Ray Train must restart the worker group
  on the nodes left, from that checkpoint, and the run must finish with the losses of an uninterrupted run
  (the session's `stage1_small`: the same preset on the same latents).

The scenario runs once (module fixture); the tests check what it left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_cluster import LocalCluster

from jobs import ray_jobs
from jobs.ray_jobs import ADDRESS_VARIABLES
from pipelines.training.config import STAGE1_SMALL

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[1]
SCENARIO_DEADLINE_S = 900
POLL_S = 0.05
# Ray notices a lost node after missed health checks (default 3 s apart, 5 missed); sooner here.
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _losses_by_step(path: Path) -> dict[int, dict]:
    """The last logged value of each step (a restarted run logs its replayed steps again)."""
    by_step = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return by_step


def _orchestrator(workflow: Path, dashboard: str, log: Path) -> subprocess.Popen:
    """`infgen run WORKFLOW --address DASHBOARD` in a session of its own, as a user's terminal runs it."""
    environment = {key: value for key, value in os.environ.items() if key not in ADDRESS_VARIABLES}
    with open(log, "ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "run", str(workflow), "--address", dashboard],
            cwd=REPOSITORY, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _wait_for(condition, what: str, deadline: float, process: subprocess.Popen | None = None, log=None):
    while not (value := condition()):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the orchestrator exited with {process.returncode}:\n"
                                 f"{log.read_text()[-4000:]}")  # fmt: skip
        assert time.monotonic() < deadline, f"{what}: not within {SCENARIO_DEADLINE_S} s"
        time.sleep(POLL_S)
    return value


def _record(run_dir: Path, stage: str) -> dict:
    path = run_dir / "workflow" / f"{stage}.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being replaced right now
        return {}


def _training_worker_nodes(dashboard: str) -> set[str]:
    """Node ids of the live Ray Train workers."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], limit=1000,
                         timeout=10, raise_on_missing_output=False)  # fmt: skip
    return {actor.node_id for actor in actors if actor.state == "ALIVE"}


def _registered_checkpoint_step(output: Path) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered (what a restart resumes
    from), None before the first: a checkpoint folder on disk is not yet one the controller knows."""
    try:
        snapshot = json.loads((output / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced right now
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return None if not latest else latest["metrics"]["step"]


@pytest.fixture(scope="module")
def scenario(stage1_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    run_dir = root / "run"
    # max-failures is a resource option: set here, it changes no stage's config hash.
    stage1 = {"preset": "stage1-small", "latents": stage1_small["latents"], "images": stage1_small["images"],
              "max-failures": 2}  # fmt: skip
    workflow = root / "multinode.yaml"
    workflow.write_text(yaml.safe_dump({
        "name": "multinode", "run_dir": str(run_dir), "experiment": "multinode",
        "stages": [{"name": "stage1", "command": "train", "options": stage1}],
    }))  # fmt: skip
    log = root / "orchestrator.log"
    cluster = LocalCluster(head_cpus=1, environment=FAST_FAILURE_DETECTION).start()
    first = second = None
    try:
        cluster.add_worker("node_a")
        cluster.add_worker("node_b")
        deadline = time.monotonic() + SCENARIO_DEADLINE_S
        client = ray_jobs.connect(cluster.dashboard)

        # 1. The orchestrator dies (SIGKILL) while the stage runs as a Ray job.
        first = _orchestrator(workflow, cluster.dashboard, log)
        job = _wait_for(lambda: _record(run_dir, "stage1").get("submission_id"), "stage1 submitted",
                        deadline, first, log)  # fmt: skip
        _wait_for(lambda: ray_jobs.job_status(client, job) == "RUNNING", "stage1 job running", deadline)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        status_after_kill = ray_jobs.job_status(client, job)

        # 2. The rerun follows the job; once a checkpoint is registered, a worker node with a training worker
        # dies.
        second = _orchestrator(workflow, cluster.dashboard, log)
        output = run_dir / "stage1"
        losses = output / "losses.jsonl"

        def checkpointed_and_past_it() -> bool:
            lines = len(losses.read_text().splitlines()) if losses.exists() else 0
            return (
                _registered_checkpoint_step(output) is not None and lines >= STAGE1_SMALL.checkpoint_every + 2
            )

        _wait_for(checkpointed_and_past_it, "a registered stage 1 checkpoint", deadline, second, log)
        names = {node_id: name for name, node_id in cluster.node_ids().items()}
        hosting = sorted(names[node_id] for node_id in _training_worker_nodes(cluster.dashboard))
        victim = next(
            name for name in hosting if name != "head"
        )  # 2 workers, 1 CPU a node: one is a worker's
        registered = _registered_checkpoint_step(output)
        steps_before_kill = [json.loads(line)["step"] for line in losses.read_text().splitlines()]
        cluster.kill_node(victim)
        assert second.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, log.read_text()[-4000:]
        jobs = [entry for entry in client.list_jobs() if (entry.metadata or {}).get("infgen_workflow")]
        yield {
            "run_dir": run_dir, "log": log.read_text(), "job": job, "status_after_kill": status_after_kill,
            "jobs": jobs, "victim": victim, "hosting": hosting,
            "alive_after": sorted(cluster.alive_node_resources()),
            "registered": registered, "steps_before_kill": steps_before_kill, "losses": losses,
            "reference": stage1_small["storage"] / "stage1" / "losses.jsonl",
        }  # fmt: skip
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        cluster.stop()


def test_a_rerun_after_the_orchestrator_was_killed_reattaches_instead_of_resubmitting(scenario):
    # The SIGKILL left the stage's job running on the cluster: it is not the orchestrator's child.
    assert scenario["status_after_kill"] in ("RUNNING", "SUCCEEDED")
    assert (
        f"its Ray job {scenario['job']} from an earlier try is still there; following it" in scenario["log"]
    )
    assert [(job.submission_id, job.metadata["infgen_stage"]) for job in scenario["jobs"]] == [
        (scenario["job"], "stage1")
    ]  # one job: nothing submitted a second time
    record = _record(scenario["run_dir"], "stage1")
    assert record["status"] == "complete" and record["submission_id"] == scenario["job"]
    assert not (scenario["run_dir"] / "superseded").exists()


def test_losing_a_worker_node_mid_training_restarts_from_the_checkpoint_with_the_same_losses(scenario):
    assert scenario["victim"] in ("node_a", "node_b") and scenario["victim"] not in scenario["alive_after"]
    assert "head" in scenario["alive_after"]
    assert max(scenario["steps_before_kill"]) < STAGE1_SMALL.steps - 1, "the node must die before the end"
    logged = [json.loads(line)["step"] for line in scenario["losses"].read_text().splitlines()]
    assert len(logged) > STAGE1_SMALL.steps, "some steps ran before the loss and again after the restart"
    restart = next(index for index, step in enumerate(logged[1:], start=1) if step <= logged[index - 1])
    # The restart resumed from the checkpoint registered before the kill (or a later one), not from step 0.
    assert logged[restart] >= scenario["registered"] > 0, logged
    assert logged[restart] % STAGE1_SMALL.checkpoint_every == 0, logged
    resumed, uninterrupted = _losses_by_step(scenario["losses"]), _losses_by_step(scenario["reference"])
    assert sorted(resumed) == sorted(uninterrupted) == list(range(STAGE1_SMALL.steps))
    for step in range(STAGE1_SMALL.steps):
        for name in ("total", "l1", "perceptual", "gan", "lr"):
            assert resumed[step][name] == pytest.approx(uninterrupted[step][name], abs=1e-6), (step, name)
    manifest = json.loads((scenario["run_dir"] / "stage1" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["steps"] == STAGE1_SMALL.steps
    assert _record(scenario["run_dir"], "stage1")["status"] == "complete"
