"""Files every stage reads and writes: input lists, checksums, JSON records, the code version.

Paths are local paths or fsspec URLs (s3://, gs://...). Local paths are made absolute before they go into a
record or to a Ray worker, since workers run in other directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

import fsspec


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers run in other directories); URLs unchanged."""
    return path if "://" in path else str(Path(path).resolve())


def resolve_inputs(paths: list[str], what: str = "input") -> list[str]:
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
                raise FileNotFoundError(f"{what} folder {path} holds no *.parquet files")
            files += [prefix + p for p in found]
        elif filesystem.exists(local):
            files.append(prefix + local)
        else:
            raise FileNotFoundError(f"{what} path {path} does not exist")
    return files


def fresh_filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """`fsspec.core.url_to_fs(path)`, with the listings this process remembers dropped.

    Object-store filesystems (s3fs, gcsfs) are shared per process and cache directory listings: a listing
    made before Ray workers wrote there would hide their files from this process (a glob finds nothing, an
    open raises FileNotFoundError). Call it before reading what other processes wrote. The whole cache goes:
    `invalidate_cache(path)` drops only `path` and its parents, and a folder below it may be the stale one.
    """
    filesystem, local = fsspec.core.url_to_fs(path)
    filesystem.invalidate_cache()
    return filesystem, local


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def exists(path: str) -> bool:
    filesystem, local = fsspec.core.url_to_fs(path)
    return filesystem.exists(local)


def write_json(path: str, content: dict) -> None:
    """Written whole, then renamed: a record that exists is complete."""
    filesystem, local = fsspec.core.url_to_fs(path)
    filesystem.makedirs(local.rsplit("/", 1)[0], exist_ok=True)
    with filesystem.open(local + ".tmp", "w") as handle:
        json.dump(content, handle, indent=2, sort_keys=False)
    filesystem.mv(local + ".tmp", local)


def read_json(path: str, what: str) -> dict:
    """`what` names the record in errors ("latent stage record", "manifest"...)."""
    try:
        with fsspec.open(path, "r") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None


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
