"""The manifest's ingredients: input files and their checksums, the code version, the run lock, JSON I/O."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import fsspec

from pipelines.errors import StageError

MANIFEST_VERSION = 1


def resolve_inputs(paths: list[str]) -> list[str]:
    """Files named, or the *.parquet files of folders named, in a stable order (it fixes the row ids)."""
    files: list[str] = []
    for path in paths:
        filesystem, local = fsspec.core.url_to_fs(path)
        protocol = filesystem.protocol if isinstance(filesystem.protocol, str) else filesystem.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if not prefix:
            local = os.path.abspath(local)  # recorded in manifests and read by Ray workers elsewhere
        if filesystem.isdir(local):
            found = sorted(filesystem.glob(local.rstrip("/") + "/*.parquet"))
            if not found:
                raise FileNotFoundError(f"metadata folder {path} holds no *.parquet files")
            files += [prefix + p for p in found]
        elif filesystem.exists(local):
            files.append(prefix + local)
        else:
            raise FileNotFoundError(f"metadata path {path} does not exist")
    return files


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def code_version() -> dict:
    """The package version, and the git commit (with a dirty flag) when run from a checkout."""
    version = {"infgen": metadata.version("infgen")}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        version.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.CalledProcessError):
        pass  # an installed wheel has no checkout; the package version stands alone
    return version


def write_json(path: str, content: dict) -> None:
    filesystem, local = fsspec.core.url_to_fs(path)
    filesystem.makedirs(local.rsplit("/", 1)[0], exist_ok=True)
    with filesystem.open(local + ".tmp", "w") as handle:
        json.dump(content, handle, indent=2, sort_keys=False)
    filesystem.mv(local + ".tmp", local)


def read_json(path: str, what: str) -> dict:
    try:
        with fsspec.open(path, "r") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None


class RunLock:
    """One writer per output folder (two img2dataset runs on one folder corrupt each other, img2dataset#285).

    A lock left by a killed run on this host is taken over once its process is gone; a lock from another
    host must be removed by hand, since we cannot tell from here whether that run is alive.
    """

    def __init__(self, path: str):
        self.path = path
        self.filesystem, self.local = fsspec.core.url_to_fs(path)

    def __enter__(self) -> RunLock:
        if self.filesystem.exists(self.local):
            holder = json.loads(self.filesystem.cat_file(self.local) or b"{}")
            if holder.get("host") != socket.gethostname():
                raise StageError(
                    f"{self.path} is held by pid {holder.get('pid')} on {holder.get('host')}; if that run is "
                    "dead, delete the lock file and rerun"
                )
            if _alive(int(holder.get("pid", 0))) and holder.get("pid") != os.getpid():
                raise StageError(f"{self.path} is held by running process {holder['pid']} on this host")
            print(f"ingest: taking over the lock of finished process {holder.get('pid')} ({self.path})")
        self.filesystem.pipe_file(
            self.local, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
        )
        return self

    def __exit__(self, *exc) -> None:
        self.filesystem.rm_file(self.local)


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
