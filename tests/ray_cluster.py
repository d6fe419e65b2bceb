"""Real Ray clusters for tests, started as a user starts them: `ray start --head`, then `ray start --address`
for each worker node, all on 127.0.0.1, each node with its own resources.

Every node is its own `ray start --block` in a new session, so a test can kill one node (the raylet and
everything it started, as a lost machine) and teardown stops only this cluster: SIGTERM to each `ray start`
(which stops what it started), then SIGKILL to whatever is left in their process groups or names the
cluster's temp dir (job drivers and workers run in process groups of their own, but their command lines or
working directories are under it). `ray stop` would kill every Ray process of the user, including the
in-process cluster that the `ray_address` session fixture (conftest.py) may have running next to this one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.ray_jobs import ADDRESS_VARIABLES

STARTUP_DEADLINE_S = 90
OBJECT_STORE_BYTES = 500_000_000  # a node's shared-memory object store: tests move little, and nodes add up
SHUTDOWN_DEADLINE_S = 20


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (all held open until all are chosen)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_port() -> int:
    return free_ports(1)[0]


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def live_processes() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if _state(int(entry)) != "Z":
                    found.append(int(entry))
            except OSError:  # gone meanwhile
                continue
    return found


def descendants(root: int) -> list[int]:
    """`root`'s live descendants (children, their children...)."""
    children: dict[int, list[int]] = {}
    for pid in live_processes():
        try:
            children.setdefault(_parent(pid), []).append(pid)
        except OSError:
            continue
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def processes_of(temp_dir: str, process_groups: list[int]) -> list[int]:
    """Live processes in `process_groups` or whose command line or cwd is under `temp_dir`."""
    found = []
    for pid in live_processes():
        try:
            if os.getpgid(pid) in process_groups:
                found.append(pid)
            elif temp_dir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
            elif os.readlink(f"/proc/{pid}/cwd").startswith(temp_dir):
                found.append(pid)
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
    return found


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Node:
    name: str
    process: subprocess.Popen  # its `ray start --block`
    log: Path


@dataclass
class LocalCluster:
    """A head (`head_cpus` CPUs) on 127.0.0.1 with its dashboard; `add_worker` joins worker nodes to it."""

    head_cpus: int = 1
    environment: dict[str, str] = field(default_factory=dict)  # extra variables for every node
    temp_dir: str = ""
    dashboard: str = ""
    gcs: str = ""
    nodes: dict[str, Node] = field(default_factory=dict)

    def start(self) -> LocalCluster:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the client reads it too (environment.md)
        self.temp_dir = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")  # short: Ray puts unix sockets under it
        dashboard_port, gcs_port, client_port, agent_port = free_ports(4)
        self.dashboard, self.gcs = f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{gcs_port}"
        command = ["--head", "--dashboard-host", "127.0.0.1", "--port", str(gcs_port), "--dashboard-port",
                   str(dashboard_port), "--ray-client-server-port", str(client_port),
                   "--dashboard-agent-listen-port", str(agent_port), "--num-cpus", str(self.head_cpus),
                   "--temp-dir", self.temp_dir]  # fmt: skip
        node = self._start("head", command)
        try:
            self._wait_until_ready(agent_port, node)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, name: str, cpus: int = 1, resources: dict[str, float] | None = None) -> Node:
        """A worker node joined to the head, with `cpus` CPUs and `resources` (plus {name: 1}, so a test can
        place work on it); returns once the cluster counts it."""
        agent_port, metrics_port = free_ports(2)
        command = ["--address", self.gcs, "--num-cpus", str(cpus), "--resources",
                   json.dumps({name: 1, **(resources or {})}), "--dashboard-agent-listen-port",
                   str(agent_port), "--metrics-export-port", str(metrics_port),
                   # Its own temp dir, as a machine of its own has: nodes sharing one would share one copy of
                   # each job's working_dir, which a node's runtime-env agent deletes when its own workers are
                   # done with it, under the feet of a driver on another node (seen: ENOENT in a stage job).
                   "--temp-dir", f"{self.temp_dir}-{name}"]  # fmt: skip
        node = self._start(name, command)
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while name not in self.alive_node_resources():
            if node.process.poll() is not None:
                raise RuntimeError(
                    f"ray start ({name}) exited with {node.process.returncode}:\n{self.tail(name)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker node {name} not in the cluster after {STARTUP_DEADLINE_S} s")
            time.sleep(0.2)
        return node

    def _start(self, name: str, arguments: list[str]) -> Node:
        bin_dir = str(Path(sys.executable).parent)
        environment = {key: value for key, value in os.environ.items() if key not in ADDRESS_VARIABLES}
        environment.update(
            # `python` in a job's entrypoint is the one on the head's PATH: this virtualenv's.
            PATH=bin_dir + os.pathsep + environment.get("PATH", ""),
            RAY_USAGE_STATS_ENABLED="0",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM would otherwise wait up to 30 s for draining
            **self.environment,
        )
        command = [os.path.join(bin_dir, "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
                   "--disable-usage-stats", "--object-store-memory", str(OBJECT_STORE_BYTES),
                   *arguments]  # fmt: skip
        log = Path(f"{self.temp_dir}-{name}.log")
        with open(log, "w") as log_file:
            process = subprocess.Popen(
                command, env=environment, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.nodes[name] = Node(name, process, log)
        return self.nodes[name]

    def tail(self, name: str, characters: int = 3000) -> str:
        return self.nodes[name].log.read_text()[-characters:]

    def _wait_until_ready(self, agent_port: int, head: Node) -> None:
        """Until the dashboard answers and so does the head's dashboard agent, which takes the submissions.

        The agent registers itself with the head right after its HTTP server is up; a job submitted before
        that waits 10 s inside the dashboard and then fails with "No available agent to submit job".
        """
        import requests

        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            if head.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.process.returncode}:\n{self.tail('head')}")
            try:
                if requests.get(f"{self.dashboard}/api/version", timeout=2).ok:
                    requests.get(f"http://127.0.0.1:{agent_port}/", timeout=2)  # any answer: it is up
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no dashboard at {self.dashboard} after {STARTUP_DEADLINE_S} s:\n"
                                   f"{self.tail('head')}")  # fmt: skip
            time.sleep(0.2)

    def alive_node_resources(self) -> dict[str, dict]:
        """{worker node name: its total resources} for the nodes the cluster counts alive ("head" for the
        head), from the dashboard's State API."""
        return {name: node.resources_total for name, node in self._alive_nodes().items()}

    def _alive_nodes(self) -> dict:
        from ray.util.state import list_nodes

        # Dead nodes stay listed (and count against the State API's limits): filter here, tolerate truncation.
        listed = list_nodes(address=self.dashboard, limit=1000, timeout=10, raise_on_missing_output=False)
        found = {}
        for node in listed:
            if node.state != "ALIVE":
                continue
            names = [name for name in self.nodes if name in (node.resources_total or {})]
            found[names[0] if names else "head" if node.is_head_node else node.node_id] = node
        return found

    def node_ids(self) -> dict[str, str]:
        """{node name: Ray node id} of the nodes alive now."""
        return {name: node.node_id for name, node in self._alive_nodes().items()}

    def kill_node(self, name: str) -> None:
        """SIGKILL a node and every process it started, at once: what losing the machine looks like to Ray."""
        node = self.nodes[name]
        doomed = [node.process.pid, *descendants(node.process.pid)]
        for pid in live_processes():
            try:
                if os.getpgid(pid) == node.process.pid and pid not in doomed:
                    doomed.append(pid)
            except OSError:
                continue
        kill_all(doomed)
        node.process.wait()

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):  # workers first, the head last
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)  # `ray start --block` stops everything it started
        for node in self.nodes.values():
            try:
                node.process.wait(timeout=SHUTDOWN_DEADLINE_S)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
        groups = [node.process.pid for node in self.nodes.values()]
        deadline = time.monotonic() + SHUTDOWN_DEADLINE_S
        while left := processes_of(self.temp_dir, groups):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of the test cluster still alive after SIGKILL: {left}")
            kill_all(left)
            time.sleep(0.1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        for name in self.nodes:
            shutil.rmtree(f"{self.temp_dir}-{name}", ignore_errors=True)
        for node in self.nodes.values():
            node.log.unlink(missing_ok=True)
