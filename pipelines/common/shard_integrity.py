"""What a stage records about each shard it writes, and the checks of whoever reads them.

The stage that writes shards lists them in its OUTPUT/manifest.json, paths relative to OUTPUT:

    "shard_files": {"stage": "latents",
                    "files": {"00000.parquet": {"sha256": "…", "bytes": 52311}, …}}

Each record is made where the shard is written, by the task or actor that wrote it: `write_parquet` hashes
and counts the bytes on their way to storage, so recording a shard costs no second read (on an object store,
no download).

Readers check in two steps, by cost. `check_shards(folder)` on the driver before any work starts: one
listing, no reading, so a missing or resized shard (a truncated copy, a disk that filled up) fails at once at
any scale (5M images are ~160 GB of latents); the workflow's records use the same listing to notice that a
finished stage's output is damaged. `read_verified(path, records)` where a shard is parsed: the whole file
is read into memory and its sha256 compared, which catches same-size changes for the price of one hash of
bytes read anyway. Both fail with one line naming the file, the stage that wrote it, what is wrong and what
to do.

A folder whose manifest has no `shard_files` (a stage that finished before shards were recorded) is not
checked: nothing vouches for its shards, and refusing it would redo finished work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import fsspec

from pipelines.common.errors import StageError
from pipelines.common.files import fresh_filesystem

MANIFEST_KEY = "shard_files"
MANIFEST_NAME = "manifest.json"  # pipelines/common/stage_output.py's; not imported: that module pulls MLflow


class DamagedShard(StageError):
    """A shard no longer holds what its stage wrote. A StageError, not a ValueError: callers that turn bad
    input into a fallback (no held-out images → no validation grid) must not swallow it."""


def shard_files(stage: str, records: dict[str, dict]) -> dict:
    """The manifest's `shard_files` entry: {relative path: {"sha256", "bytes"}}, in name order."""
    return {"stage": stage, "files": {relative: records[relative] for relative in sorted(records)}}


class HashingWriter:
    """A file handle for writers that hashes and counts the bytes as they pass (what pyarrow's Parquet
    writer needs: write, tell, flush, closed)."""

    def __init__(self, handle):
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += memoryview(data).nbytes
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.handle.flush()

    @property
    def closed(self) -> bool:
        return self.handle.closed

    def writable(self) -> bool:
        return True

    def record(self) -> dict:
        return {"sha256": self.digest.hexdigest(), "bytes": self.size}


def write_parquet(table, filesystem: fsspec.AbstractFileSystem, path: str, **options) -> dict:
    """Write `table` to `path` (a path of `filesystem`) as PATH.tmp, then rename, so a reader never sees half
    a shard; returns its record {"sha256", "bytes"}."""
    import pyarrow.parquet as pq

    with filesystem.open(f"{path}.tmp", "wb") as handle:
        writer = HashingWriter(handle)
        pq.write_table(table, writer, **options)
    filesystem.mv(f"{path}.tmp", path)
    return writer.record()


def file_record(path: str) -> dict:
    """The record of a shard already on storage, by reading it (shards written before records existed)."""
    digest, size = hashlib.sha256(), 0
    with fsspec.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            size += len(block)
    return {"sha256": digest.hexdigest(), "bytes": size}


@dataclass(frozen=True)
class ShardRecords:
    """The shards a stage's manifest vouches for that lie in one folder."""

    stage: str
    manifest: str  # the manifest's path, for messages
    folder: str  # the folder checked (the paths below are in it)
    files: dict[str, dict]  # shard name in `folder` → {"sha256", "bytes"}

    def record(self, path: str) -> dict | None:
        """The record of the shard at `path`, a path in `folder` (local, or with or without its protocol)."""
        return self.files.get(_split(path)[1])

    def advice(self) -> str:
        return (f"rerun the {self.stage} stage (`infgen {self.stage}` with the same options, or `infgen run` "
                "on the workflow) to write it again")  # fmt: skip


def _split(path: str) -> tuple[str, str]:
    folder, _, name = path.rstrip("/").rpartition("/")
    return folder, name


def _manifest(path: str) -> dict | None:
    filesystem, local = fsspec.core.url_to_fs(path)
    if not filesystem.exists(local):
        return None
    try:
        return json.loads(filesystem.cat_file(local))
    except json.JSONDecodeError as error:
        raise ValueError(f"manifest {path} is not valid JSON: {error}") from None


def shard_records(folder: str) -> ShardRecords | None:
    """The records of the shards in `folder`, from the manifest beside them (FOLDER/manifest.json) or, when
    there is none, one level up (an ingest's images/: INGEST/manifest.json lists images/NNNNN.parquet); None
    when no manifest lists shards there."""
    folder = folder.rstrip("/")
    parent, name = _split(folder)
    manifest_path, prefix = f"{folder}/{MANIFEST_NAME}", ""
    manifest = _manifest(manifest_path)
    if manifest is None and parent:
        manifest_path, prefix = f"{parent}/{MANIFEST_NAME}", f"{name}/"
        manifest = _manifest(manifest_path)
    entry = (manifest or {}).get(MANIFEST_KEY)
    if not entry:
        return None
    files = {relative[len(prefix) :]: record for relative, record in entry["files"].items()
             if relative.startswith(prefix) and "/" not in relative[len(prefix) :]}  # fmt: skip
    if prefix and not files:
        return None  # the manifest above lists shards elsewhere, not in this folder
    return ShardRecords(entry["stage"], manifest_path, folder, files)


def file_sizes(folder: str) -> dict[str, int]:
    """{name: bytes} of the files directly in `folder`: one listing (cached listings dropped first, since
    other processes wrote there)."""
    filesystem, local = fresh_filesystem(folder)
    if not filesystem.isdir(local):
        return {}
    return {
        entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry.get("size") or 0)
        for entry in filesystem.ls(local, detail=True)
        if entry.get("type") != "directory"
    }


def damage(records: ShardRecords, unlisted: bool = True) -> list[str]:
    """What is wrong with the shards `records` vouches for, one sentence each, from one listing: a missing
    shard, one of another size than recorded, and (with `unlisted`) a *.parquet file no record names, which a
    reader globbing the folder would take for part of the dataset."""
    sizes = file_sizes(records.folder)
    found = []
    for name, record in records.files.items():
        path = f"{records.folder}/{name}"
        if name not in sizes:
            found.append(f"shard {path} is missing: the {records.stage} stage wrote it (manifest "
                         f"{records.manifest}); {records.advice()}")  # fmt: skip
        elif sizes[name] != record["bytes"]:
            found.append(
                f"shard {path} is {sizes[name]} bytes, the {records.stage} stage wrote {record['bytes']} "
                f"(manifest {records.manifest}): truncated or replaced since; {records.advice()}"
            )
    if unlisted:
        for name in sorted(set(sizes) - set(records.files)):
            if name.endswith(".parquet"):
                found.append(
                    f"shard {records.folder}/{name} was not written by the {records.stage} stage (manifest "
                    f"{records.manifest} does not list it) but would be read with its shards: remove it"
                )
    return found


def output_damage(output: str, manifest: dict) -> list[str]:
    """What is wrong with the shards a stage's manifest (OUTPUT/manifest.json, already read) lists, by
    listing each folder they are in once: missing or resized ones only (files it does not list are left to
    the readers, which would take them for shards)."""
    entry = manifest.get(MANIFEST_KEY)
    if not entry:
        return []
    by_folder: dict[str, dict[str, dict]] = {}
    for relative, record in entry["files"].items():
        folder, _, name = relative.rpartition("/")
        by_folder.setdefault(folder, {})[name] = record
    found = []
    manifest_path = f"{output.rstrip('/')}/{MANIFEST_NAME}"
    for folder, files in by_folder.items():
        path = "/".join(part for part in (output.rstrip("/"), folder) if part)
        found += damage(ShardRecords(entry["stage"], manifest_path, path, files), unlisted=False)
    return found


def check_shards(folder: str, what: str = "") -> ShardRecords | None:
    """Fail with one line (DamagedShard) when a shard of `folder` is missing, has another size than its
    stage recorded, or is not one it wrote; returns the records for `read_verified` (None: nothing vouches
    for this folder's shards, so nothing is checked). `what` names the reader's input in the message."""
    records = shard_records(folder)
    if records is None:
        return None
    problems = damage(records)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s) in {folder})" if len(problems) > 1 else ""
        raise DamagedShard(f"{what + ': ' if what else ''}{problems[0]}{more}")
    return records


def read_verified(path: str, records: ShardRecords | None, filesystem=None) -> bytes:
    """The whole file at `path`, after checking its sha256 and size against `records` (when it vouches for
    it): parse it from memory (pyarrow.BufferReader), so the bytes checked are the bytes used."""
    if filesystem is None:
        filesystem, path = fsspec.core.url_to_fs(path)
    data = filesystem.cat_file(path)
    record = records.record(path) if records is not None else None
    if record is None:
        return data
    actual = hashlib.sha256(data).hexdigest()
    if actual != record["sha256"] or len(data) != record["bytes"]:
        raise DamagedShard(
            f"shard {path} does not hold the bytes the {records.stage} stage wrote (sha256 {actual[:12]}…, "
            f"{len(data)} bytes; manifest {records.manifest} says {record['sha256'][:12]}…, "
            f"{record['bytes']} bytes): delete it and {records.advice()}"
        )
    return data
