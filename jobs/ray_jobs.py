"""Run a pipeline stage on a running Ray cluster as a Ray job (the Job Submission SDK).

    submit_stage("http://HEAD:8265", ["ingest", "--metadata", "s3://b/meta/", "--output", "s3://b/v1"],
                 working_dir=".", env_vars={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})

does what `ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.cli ingest ...` does:
uploads the working directory (without virtualenvs, caches and run outputs), starts `python -m jobs.cli
ARGUMENTS...` on the head node with those environment variables, streams the job's log as it arrives and
waits for the end. It returns on SUCCEEDED and raises `JobFailed` (status, Ray's message and the last lines
of the log) on FAILED or STOPPED. Ctrl-C while waiting stops the job before re-raising, so no job keeps
running unwatched. `submit_command` does the same for any shell command.

Addresses: the Job SDK talks to the cluster's dashboard over HTTP, `http://HEAD:8265` by default (the
`--dashboard-port` of `ray start --head`). `HOST:PORT` without a scheme means `http://HOST:PORT`. A GCS
address (`HEAD:6379`: what `ray.init`, this project's `--ray-address` and, inside a Ray job, RAY_ADDRESS hold)
is accepted too: when the port answers but not in HTTP/1.1, the cluster's GCS is asked where its dashboard
is (the address the head registered, reachable from inside the cluster; from outside it only where the head
advertises a reachable address). The question goes through a GCS client object of its own, not `ray.init`
nor Ray's SDK, which would also repoint this process's internal KV at that cluster. `auto` means the cluster
this machine belongs to (what `ray start` recorded, or RAY_ADDRESS inside a job). A Ray Client address
(`ray://HEAD:10001`) is refused with a message naming the dashboard address to use instead.
`--address` wins over `RAY_API_SERVER_ADDRESS`, which wins over `RAY_ADDRESS` (`dashboard_address`); Ray's
`JobSubmissionClient` itself lets those variables override an explicit address, which we do not.

`follow_job` attaches to a job already submitted (a workflow rerun finds one still running), `job_status`
and `stop_job` ask about and stop one by its submission id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import TextIO

from jobs.ray_session import OFFLINE_ENVIRONMENT

ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
DEFAULT_DASHBOARD_PORT = 8265

# Never uploaded with the working directory (gitwildmatch patterns, relative to it). Ray also honours the
# directory's .gitignore and .rayignore files; these hold where those are missing or ignored
# (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1). Ray refuses a package of 512 MiB or more (GCS storage limit).
WORKING_DIR_EXCLUDES = (
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    ".cache",
    ".whl",
    "runs",
    "mlruns",
    "mlartifacts",
    "*.parquet",
)

# In the job's environment on top of the caller's. A job's driver that calls ray.init(runtime_env=...) with
# env var keys the job's runtime_env already sets fails with "Failed to merge the Job's runtime env" unless
# RAY_OVERRIDE_JOB_RUNTIME_ENV=1 (ray/_private/worker.py); jobs.ray_session.connect_ray passes
# OFFLINE_ENVIRONMENT exactly that way, so every Ray stage would fail as a job without it.
JOB_ENVIRONMENT = {**OFFLINE_ENVIRONMENT, "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}

# Ray's failure message repeats the log's last lines after this; JobFailed carries its own tail instead.
_RAY_LOG_TAIL_MARKER = ", last available logs (truncated to"


class NotHttp(ValueError):
    """The address answers, but not in HTTP/1.1: a GCS (or Ray Client) port rather than the dashboard."""


class JobFailed(RuntimeError):
    """A Ray job that ended FAILED or STOPPED: its status, Ray's message and the last lines of its log."""

    def __init__(
        self,
        submission_id: str,
        status: str,
        message: str,
        log_tail: str,
        *,
        address: str = "",
        driver_exit_code: int | None = None,
    ):
        self.submission_id = submission_id
        self.status = status
        self.message = message
        self.log_tail = log_tail
        self.address = address
        self.driver_exit_code = driver_exit_code
        lines = log_tail.count("\n") + 1 if log_tail else 0
        text = f"ray job {submission_id} {status}: {message or 'no message'}"
        if log_tail:
            text += f"\n--- last {lines} lines of its log ---\n{log_tail}"
        else:
            text += "\n(its log is empty)"
        super().__init__(text)


def dashboard_address(address: str | None = None) -> str | None:
    """The address to submit jobs to: `address`, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else None.

    Returned as given (stripped); `submit_command` normalises and checks it.
    """
    for candidate in (address, *(os.environ.get(name) for name in ADDRESS_VARIABLES)):
        if candidate and candidate.strip():
            return candidate.strip()
    return None


def _normalise(address: str) -> str:
    """`address` as the dashboard's base URL; refuses what the Job SDK cannot use directly."""
    if address.startswith("ray://"):
        host = address[len("ray://") :].split("/")[0].rsplit(":", 1)[0]
        raise ValueError(
            f"{address} is a Ray Client address; jobs are submitted to the cluster's dashboard over HTTP: "
            f"use http://{host}:{DEFAULT_DASHBOARD_PORT} (the head's --dashboard-port)"
        )
    if address == "local":
        raise ValueError(
            f"address {address!r} is not a dashboard address: pass http://HEAD:{DEFAULT_DASHBOARD_PORT}"
        )
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"{address} is not an http(s) address of a Ray dashboard")
    return address.rstrip("/")


def _check_dashboard(url: str, timeout: float) -> None:
    """Fail fast, naming `url`, when nothing answers there or what answers is not a Ray dashboard.

    Ray's client sends its requests without a timeout: a host that drops packets would hang it for minutes.
    """
    import requests

    try:
        response = requests.get(f"{url}/api/version", timeout=timeout)
    except requests.Timeout as error:
        raise ConnectionError(
            f"the Ray dashboard at {url} did not answer within {timeout:g} s ({type(error).__name__}); "
            "is the head node up and is this its dashboard address?"
        ) from error
    except requests.RequestException as error:
        reason = str(error)
        if "BadStatusLine" in reason or "RemoteDisconnected" in reason:  # answers, but not in HTTP/1.1
            raise NotHttp(
                f"{url} is not a Ray dashboard: it does not answer HTTP (a GCS or Ray Client port, such as "
                f"6379 or 10001?); jobs go to the head's dashboard, http://HEAD:{DEFAULT_DASHBOARD_PORT} by "
                "default"
            ) from None
        for known in ("Connection refused", "Name or service not known", "Network is unreachable"):
            if known in reason:
                reason = known
                break
        raise ConnectionError(
            f"cannot reach the Ray dashboard at {url}: {reason}; is the head node up, and is this its "
            f"dashboard address (http://HEAD:{DEFAULT_DASHBOARD_PORT})?"
        ) from error
    if response.status_code in (401, 403):
        return  # token authentication: JobSubmissionClient sends the token and explains a refusal itself
    try:
        ray_version = response.json()["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"{url} answered GET /api/version with HTTP {response.status_code} but is not a Ray dashboard; "
            f"jobs go to the head's dashboard, http://HEAD:{DEFAULT_DASHBOARD_PORT} by default (not the GCS "
            "port 6379 nor the Ray Client port 10001)"
        ) from None
    if not isinstance(ray_version, str):
        raise ValueError(f"{url} does not look like a Ray dashboard (ray_version: {ray_version!r})")


def dashboard_from_gcs(gcs_address: str, timeout: float = 10.0) -> str:
    """The dashboard URL that the cluster whose GCS is at `gcs_address` (HOST:PORT, or "auto") registered.

    ValueError, naming the address, when nothing there says where the dashboard is.
    """
    from ray._private import ray_constants
    from ray._private.services import canonicalize_bootstrap_address
    from ray._raylet import GcsClient
    from ray.exceptions import RpcError

    resolved = canonicalize_bootstrap_address(gcs_address) if gcs_address == "auto" else gcs_address
    if not resolved:
        raise ValueError(
            "address 'auto': no Ray cluster runs on this machine (no RAY_ADDRESS, nothing `ray start` "
            f"recorded); pass the dashboard's address, http://HEAD:{DEFAULT_DASHBOARD_PORT}"
        )
    try:
        value = GcsClient(address=resolved).internal_kv_get(
            ray_constants.DASHBOARD_ADDRESS.encode(), namespace=ray_constants.KV_NAMESPACE_DASHBOARD,
            timeout=timeout,
        )  # fmt: skip
    except RpcError as error:
        raise ValueError(
            f"{resolved} is neither a Ray dashboard nor a GCS that knows its dashboard ({error}); jobs go to "
            f"the head's dashboard, http://HEAD:{DEFAULT_DASHBOARD_PORT} by default"
        ) from None
    if not value:
        raise ValueError(f"the Ray cluster at {resolved} has no dashboard registered (started without one?)")
    return f"http://{value.decode()}"


def dashboard_url(address: str | None = None, *, timeout: float = 10.0) -> str:
    """The dashboard's base URL for `address` (see `dashboard_address`): a dashboard as given, a GCS address
    or "auto" mapped through the cluster's GCS; checked to answer as a Ray dashboard."""
    resolved = dashboard_address(address)
    if resolved is None:
        raise ValueError(
            "no Ray cluster to submit to: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS"
        )
    if resolved == "auto":
        url = dashboard_from_gcs("auto", timeout)
        _check_dashboard(url, timeout)
        return url
    url = _normalise(resolved)
    try:
        _check_dashboard(url, timeout)
    except NotHttp:
        try:
            mapped = dashboard_from_gcs(url.split("://", 1)[1], timeout)
        except ValueError:
            raise NotHttp(
                f"{url} is not a Ray dashboard: it does not answer HTTP, nor as a GCS that knows its "
                f"dashboard (a Ray Client port such as 10001?); jobs go to the head's dashboard, "
                f"http://HEAD:{DEFAULT_DASHBOARD_PORT} by default"
            ) from None
        _check_dashboard(mapped, timeout)
        return mapped
    return url


@contextlib.contextmanager
def _without_address_variables():
    """JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None = None, *, timeout: float = 10.0):
    """A JobSubmissionClient for the dashboard at `address` (see `dashboard_address`), checked first."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address, timeout=timeout)
    with _without_address_variables():
        return JobSubmissionClient(url)


def new_submission_id(stage: str) -> str:
    """`infgen-<stage>-<8 hex>`: readable in `ray job list`, unique per submission."""
    slug = re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-") or "job"
    return f"infgen-{slug[:40]}-{uuid.uuid4().hex[:8]}"


def _runtime_env(
    working_dir: str | os.PathLike | None, env_vars: dict[str, str], excludes: tuple[str, ...] | list[str]
) -> dict:
    for name, value in env_vars.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(f"environment variables must map str to str: {name!r}={value!r}")
    runtime_env: dict = {"env_vars": {**JOB_ENVIRONMENT, **env_vars}}
    if working_dir is not None:
        working_dir = os.fspath(working_dir)
        if "://" in working_dir:  # a remote package (s3://.../code.zip): Ray fetches it as it is
            runtime_env["working_dir"] = working_dir
        else:
            path = Path(working_dir)
            if not path.is_dir():
                raise FileNotFoundError(f"working_dir {working_dir} is not a directory")
            runtime_env["working_dir"] = str(path.resolve())
            runtime_env["excludes"] = list(excludes)
    return runtime_env


def _write(output: TextIO, text: str) -> None:
    output.write(text)
    output.flush()


async def _stream_logs(client, submission_id: str, output: TextIO, written: list[int]) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        _write(output, chunk)
        written[0] += len(chunk)


async def _stream_until_done(
    client, submission_id: str, output: TextIO, poll_interval: float, written
) -> bool:
    """Copy the log as the dashboard pushes it (websocket) until the job's status is terminal; True when
    Ctrl-C (SIGINT) or SIGTERM interrupted the wait.

    Ray's own tail closes the websocket 2-3 s after the job ends (it sleeps 1 s at each end of file and
    checks the status in between); polling the status stops waiting within `poll_interval` instead. Ctrl-C
    is taken by the loop itself (not left to asyncio.run's handling, which depends on the SIGINT handler
    other libraries left installed): it cancels the wait, and the caller stops the job.
    """
    loop = asyncio.get_running_loop()
    waiting = asyncio.current_task()
    interrupted: list[bool] = []

    def interrupt() -> None:
        interrupted.append(True)
        waiting.cancel()

    # SIGTERM too: `ray job stop` stops a job's driver with it, and a workflow running as a Ray job must stop
    # the stage job it waits for rather than leave it running unwatched.
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, interrupt)
        handling_sigint = True
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread: KeyboardInterrupt as usual
        handling_sigint = False
    stream = asyncio.ensure_future(_stream_logs(client, submission_id, output, written))
    try:
        while True:
            await asyncio.wait({stream}, timeout=poll_interval)  # wakes early if the stream ends
            if stream.done() and stream.exception() is not None:
                error = stream.exception()  # e.g. a proxy that does not pass websockets
                _write(output, f"ray job: log stream broke off ({type(error).__name__}: {error}); polling\n")
                return False
            info = await asyncio.to_thread(client.get_job_info, submission_id)
            if info.status.is_terminal() or stream.done():
                return bool(interrupted)
    except asyncio.CancelledError:
        if interrupted:
            return True
        raise
    finally:
        if handling_sigint:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)  # which leaves SIG_DFL: put the caller's back
            signal.signal(signal.SIGTERM, previous_sigterm)
        stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)


def _follow(client, submission_id: str, output: TextIO, poll_interval: float):
    """Copy the job's log to `output` as it grows; return the job's final JobDetails and its whole log."""
    written = [0]  # characters of the log already copied
    try:
        asyncio.get_running_loop()  # called from async code (a notebook...): asyncio.run cannot nest; poll
    except RuntimeError:
        if asyncio.run(_stream_until_done(client, submission_id, output, poll_interval, written)):
            raise KeyboardInterrupt from None
    while True:  # once, unless the stream broke off: the rest of the log, polled
        info = client.get_job_info(submission_id)
        # Read the log after the status: once the status is terminal the log is complete.
        log = client.get_job_logs(submission_id)
        if len(log) > written[0]:
            _write(output, log[written[0] :])
            written[0] = len(log)
        if info.status.is_terminal():
            return info, log
        time.sleep(poll_interval)


def _tail(log: str, lines: int) -> str:
    return "\n".join(log.splitlines()[-lines:]) if lines > 0 else ""


def _stop(client, submission_id: str, address: str, output: TextIO) -> None:
    try:
        stopped = client.stop_job(submission_id)
        what = "stopped" if stopped else "was no longer running:"
        _write(output, f"\nray job: interrupted; {what} {submission_id}\n")
    except Exception as error:  # the job may not exist yet (interrupted mid-submit), or the cluster is gone
        _write(
            output,
            f"\nray job: interrupted; could not stop {submission_id} ({error}); check with "
            f"`ray job status --address {address} {submission_id}`\n",
        )


def _submit(client, submission_id: str, output: TextIO, wait_s: float, **job) -> None:
    """client.submit_job, retried while the head's job agent is not up yet (a cluster that just started).

    The dashboard answers before its job agent has registered and then refuses submissions with HTTP 500
    "No available agent to submit job, please try again later" (after waiting 10 s itself). It says the
    same when the agent accepted the job but answered too late, so look for the job before resubmitting.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.submit_job(submission_id=submission_id, **job)
            return
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
        try:
            client.get_job_info(submission_id)
            return  # it was created after all
        except RuntimeError:
            pass
        _write(output, "ray job: the head node's job agent is not up yet; submitting again\n")
        time.sleep(1)


def submit_command(
    address: str | None,
    entrypoint: str,
    *,
    working_dir: str | os.PathLike | None,
    env_vars: dict[str, str] | None = None,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
    excludes: tuple[str, ...] | list[str] = WORKING_DIR_EXCLUDES,
    output: TextIO | None = None,
    log_tail_lines: int = 50,
    connect_timeout: float = 10.0,
    poll_interval: float = 1.0,
    agent_wait_s: float = 60.0,
    follow: bool = True,
) -> dict:
    """Run the shell command `entrypoint` as a Ray job on the cluster at `address` and wait for it.

    `working_dir` (a local directory, uploaded without `excludes`; a remote package URI; or None for
    code already on the cluster) becomes the job's current directory; `env_vars` are added to the job's
    environment (after the offline defaults). The job's log is copied to `output` (default: stdout) as
    it arrives. Returns {"submission_id", "status": "SUCCEEDED", "message", "address", "entrypoint",
    "driver_exit_code", "start_time", "end_time"} (times in ms since the epoch, as Ray gives them). Raises
    JobFailed on FAILED/STOPPED, ConnectionError when `address` does not answer within `connect_timeout`,
    ValueError when it is not a dashboard address. A cluster that has just started gets `agent_wait_s`
    for its job agent to come up. `follow=False` returns once the job is submitted ({"submission_id",
    "status": "SUBMITTED", "address", "entrypoint"}), leaving it to run.
    """
    output = sys.stdout if output is None else output
    runtime_env = _runtime_env(working_dir, dict(env_vars or {}), excludes)
    client = connect(address, timeout=connect_timeout)
    url = client.get_address()
    submission_id = submission_id or new_submission_id(entrypoint.split()[0] if entrypoint.split() else "job")
    try:
        _submit(
            client,
            submission_id,
            output,
            agent_wait_s,
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            metadata=metadata,
        )
        _write(
            output,
            f"ray job: submitted {submission_id} to {url}\n"
            f"  follow: ray job logs --address {url} --follow {submission_id}\n"
            f"  stop:   ray job stop --address {url} {submission_id}\n",
        )
        if not follow:
            return {"submission_id": submission_id, "status": "SUBMITTED", "address": url,
                    "entrypoint": entrypoint}  # fmt: skip
        return _await(client, submission_id, output, log_tail_lines, poll_interval)
    except KeyboardInterrupt:
        _stop(client, submission_id, url, output)
        raise


def follow_job(
    address: str | None,
    submission_id: str,
    *,
    output: TextIO | None = None,
    log_tail_lines: int = 50,
    connect_timeout: float = 10.0,
    poll_interval: float = 1.0,
) -> dict:
    """Attach to the job `submission_id` that is already on the cluster: copy its log (from the start) and
    wait for its end, as `submit_command` does for a job it submitted (result, JobFailed, Ctrl-C stops it)."""
    output = sys.stdout if output is None else output
    client = connect(address, timeout=connect_timeout)
    _write(output, f"ray job: following {submission_id} on {client.get_address()}\n")
    try:
        return _await(client, submission_id, output, log_tail_lines, poll_interval)
    except KeyboardInterrupt:
        _stop(client, submission_id, client.get_address(), output)
        raise


def _await(client, submission_id: str, output: TextIO, log_tail_lines: int, poll_interval: float) -> dict:
    url = client.get_address()
    try:
        info, log = _follow(client, submission_id, output, poll_interval)
    except Exception as error:  # the dashboard went away or failed a request: the job may still run
        raise RuntimeError(
            f"lost track of ray job {submission_id} on {url} ({type(error).__name__}: {error}); it may "
            f"still be running: ray job status --address {url} {submission_id}"
        ) from error
    status = str(info.status)
    message = (info.message or "").split(_RAY_LOG_TAIL_MARKER)[0].strip()
    if status != "SUCCEEDED":
        # Ray writes this line into the log through a buffered file it flushes only after starting the
        # entrypoint (job_supervisor.py), so a quick command's output can come before it: keep it out of
        # the tail, which is the command's own last lines.
        header = f"Running entrypoint for job {submission_id}: {info.entrypoint}\n"
        raise JobFailed(
            submission_id,
            status,
            message,
            _tail(log.replace(header, "", 1), log_tail_lines),
            address=url,
            driver_exit_code=info.driver_exit_code,
        )
    _write(output, f"ray job: {submission_id} SUCCEEDED\n")
    return {
        "submission_id": submission_id,
        "status": status,
        "message": message,
        "address": url,
        "entrypoint": info.entrypoint,
        "driver_exit_code": info.driver_exit_code,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def job_status(client, submission_id: str) -> str | None:
    """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), None when the cluster has no such
    job (never submitted, or the cluster was restarted since)."""
    try:
        return str(client.get_job_status(submission_id))
    except RuntimeError as error:  # the SDK's "Request failed with status code 404: Job ... does not exist"
        if "404" in str(error) or "does not exist" in str(error):
            return None
        raise


def stage_entrypoint(arguments: list[str], python: str = "python") -> str:
    """The shell command that runs `infgen ARGUMENTS...` from the uploaded working directory."""
    return shlex.join([python, "-m", "jobs.cli", *arguments])


def submit_stage(
    address: str | None,
    arguments: list[str],
    *,
    working_dir: str | os.PathLike | None,
    env_vars: dict[str, str] | None = None,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
    python: str = "python",
    **options,
) -> dict:
    """Run one pipeline stage, `infgen ARGUMENTS...` (e.g. ["ingest", "--embedded", "240", ...]), as a
    Ray job: `python -m jobs.cli ARGUMENTS...` in the uploaded `working_dir`, with `python` as found on the
    head node's PATH. Further options (output, log_tail_lines, excludes, connect_timeout...) and the result
    as for `submit_command`.
    """
    if not arguments:
        raise ValueError("no stage to run: arguments must start with an infgen subcommand")
    stage = arguments[0]
    return submit_command(
        address,
        stage_entrypoint(arguments, python),
        working_dir=working_dir,
        env_vars=env_vars,
        submission_id=submission_id or new_submission_id(stage),
        metadata={"infgen_stage": stage, **(metadata or {})},
        **options,
    )
