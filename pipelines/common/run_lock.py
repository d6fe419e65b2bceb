"""One writer per output folder: two runs writing one output corrupt each other (img2dataset#285 is that bug
for two img2dataset runs; our stages' records and part files would mix the same way).

Local paths are locked atomically: the lock file is held with an exclusive `flock` for as long as the run
lasts, so two processes can never both hold it, and the kernel lets go of it when its holder dies, however it
died. The file also names its holder (host, pid, and the Ray job it is the driver of) for the messages: a
second copy of a stage submitted as a Ray job refuses at once, naming the job to stop. Object stores (s3://,
gs://) have no locks: there the file is checked, then written, which narrows the race without closing it; run
one writer per output there (the workflow does).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket

import fsspec

from pipelines.common.errors import StageError
from pipelines.common.ray_job import own_submission_id


def _holder() -> dict:
    holder = {"host": socket.gethostname(), "pid": os.getpid()}
    job = own_submission_id()
    if job:
        holder["ray_job"] = job
    return holder


def _named(holder: dict, where: str) -> str:
    """Who holds a lock, as the messages say it: process 123 on HOST (Ray job ID: how to stop it)."""
    job = (
        f" (Ray job {holder['ray_job']}: `ray job stop {holder['ray_job']}` ends it)"
        if holder.get("ray_job")
        else ""
    )
    return f"process {holder.get('pid', '?')} on {where}{job}"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse_if_held(path: str, holder: dict) -> None:
    """A holder on another host may be alive: we cannot tell from here. One on this host is asked directly
    (a pid that lives but holds no lock is treated as alive too: better a clear refusal than two writers)."""
    if not holder:
        return
    if holder.get("host") != socket.gethostname():
        raise StageError(
            f"{path} is held by {_named(holder, holder.get('host'))}; if that run is dead, delete the lock "
            "file and rerun"
        )
    pid = int(holder.get("pid", 0))
    if pid != os.getpid() and _alive(pid):
        raise StageError(f"{path} is held by running {_named(holder, 'this host')}")


class RunLock:
    def __init__(self, path: str):
        self.path = path
        self.filesystem, self.local = fsspec.core.url_to_fs(path)
        self.is_local = "file" in (
            self.filesystem.protocol
            if isinstance(self.filesystem.protocol, tuple)
            else (self.filesystem.protocol,)
        )
        self._descriptor: int | None = None

    def __enter__(self) -> RunLock:
        if self.is_local:
            self._lock_local()
        else:
            self._lock_remote()
        return self

    def __exit__(self, *exc) -> None:
        if self._descriptor is not None:
            os.unlink(self.local)  # before letting go, so nobody locks a file that is about to vanish
            os.close(self._descriptor)  # closing releases the flock
            self._descriptor = None
        else:
            self.filesystem.rm_file(self.local)

    def _lock_local(self) -> None:
        os.makedirs(os.path.dirname(self.local) or ".", exist_ok=True)
        while True:
            descriptor = os.open(self.local, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(descriptor)
                os.close(descriptor)
                where = holder.get("host", "this host")
                raise StageError(f"{self.path} is held by running {_named(holder, where)}") from None
            # The file may have been unlinked by its last holder between our open and our flock: then we hold
            # a lock on a file nobody else will see. Start again on the file the path names now.
            try:
                same = os.fstat(descriptor).st_ino == os.stat(self.local).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(descriptor)
        holder = self._read(descriptor)
        try:
            _refuse_if_held(self.path, holder)
        except StageError:
            os.close(descriptor)
            raise
        if holder:
            print(f"taking over the lock of finished process {holder.get('pid')} ({self.path})", flush=True)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(_holder()).encode(), 0)
        self._descriptor = descriptor

    @staticmethod
    def _read(descriptor: int) -> dict:
        text = os.pread(descriptor, 1 << 16, 0)
        try:
            return json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            return {}

    def _lock_remote(self) -> None:
        if self.filesystem.exists(self.local):
            holder = json.loads(self.filesystem.cat_file(self.local) or b"{}")
            _refuse_if_held(self.path, holder)
            print(f"taking over the lock of finished process {holder.get('pid')} ({self.path})", flush=True)
        self.filesystem.pipe_file(self.local, json.dumps(_holder()).encode())
