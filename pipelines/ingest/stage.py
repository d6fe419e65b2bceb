"""The ingest stage: metadata → selection → img2dataset on Ray → verification → manifest.

The selection and the verification catch-up run as plain Ray tasks, one per work unit or shard, with typed
arguments; only compact ids and counts come back to the driver. Every step is resumable: the selection is
reused when its fingerprint matches, img2dataset skips finished shards, and verification skips shards whose
`images/` file exists. Rerunning the same command after a crash finishes the job; nothing finished is redone
and keys never change. A verified shard whose images/ or rejects/ file has gone missing or changed size since
(checked against its record in verified/, one listing) is verified again from its raw download, or downloaded
again when that is gone; the other shards stay. The manifest lists every shard file's sha256 and size
(`shard_files`, pipelines/common/shard_integrity.py) for the stages that read them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq
import ray

from pipelines.common.errors import StageError
from pipelines.common.files import absolute, file_sha256, read_json, resolve_inputs, write_json
from pipelines.common.run_lock import RunLock
from pipelines.common.shard_integrity import file_record, file_sizes, shard_files
from pipelines.common.stage_output import finish_stage, manifest_header
from pipelines.common.tracking import PROGRESS_INTERVAL_S, StageTracking, report_progress
from pipelines.ingest import selection as select
from pipelines.ingest.accounting import build_counts, check_counts
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.download import SHARD_DIGITS, img2dataset_arguments, run_download
from pipelines.ingest.layout import IngestLayout
from pipelines.ingest.verification import VerifyingResizer, verify_shard

MANIFEST_VERSION = 2  # 2: shard_files; version 1 manifests are still read (their shards are not checked)
READABLE_VERSIONS = (1, 2)
STAGE = "ingest"
Progress = Callable[[str], None]


def _spread_task(function: Callable) -> ray.remote_function.RemoteFunction:
    # One task per input, unit or shard, 1 CPU each, spread over the nodes rather than filling the driver's
    # node first (Ray's default): every task reads or writes storage, and spreading them spreads the I/O.
    return ray.remote(scheduling_strategy="SPREAD")(function)


_checksum_task = _spread_task(file_sha256)
_record_task = _spread_task(file_record)
_classify_task = _spread_task(select.classify_unit)
_write_part_task = _spread_task(select.write_unit_selection)


def run_ingest(
    metadata: list[str],
    output: str,
    config: IngestConfig,
    progress: Progress = print,
    source: dict | None = None,
    tracking: StageTracking | None = None,
) -> dict:
    """Run (or resume) the stage; returns the manifest, logged to MLflow when `tracking` is given."""
    paths = resolve_inputs(metadata, "metadata")  # bad input fails here, before anything is created
    layout = IngestLayout(absolute(output))  # Ray tasks do not share the driver's current directory
    layout.make_directories()
    started = time.perf_counter()
    with RunLock(layout.lock):
        inputs = checksum_inputs(paths)
        record = run_selection(inputs, layout, config, progress)
        discard_damaged_shards(layout, progress)
        download_selection(record, layout, config, progress)
        run_verification(layout, config, progress)
        outcomes = collect_outcomes(layout)
        manifest = build_manifest(inputs, source, config, record, outcomes, started)
        manifest["shard_files"] = recorded_shard_files(layout, outcomes)
        finish_stage(STAGE, layout.root, manifest, tracking, progress)
    counts = manifest["counts"]
    progress(
        f"ingest: kept {counts['buckets']['kept']} of {counts['input_rows']} rows; manifest {layout.manifest}"
    )
    return manifest


def checksum_inputs(paths: list[str]) -> list[dict]:
    """[{"path", "sha256"}] per metadata file, in input order: what the selection and the manifest record."""
    checksums = ray.get([_checksum_task.remote(path) for path in paths])
    return [{"path": path, "sha256": checksum} for path, checksum in zip(paths, checksums)]


def fingerprint(inputs: list[dict], config: IngestConfig) -> dict:
    """What determines the selection and its keys: the inputs' bytes, the filters, the shard size."""
    return {
        "inputs": [{"index": i, "sha256": entry["sha256"]} for i, entry in enumerate(inputs)],
        "filters": config.to_dict()["filters"],
        "allow_hosts": sorted(config.allow_hosts),
        "samples_per_shard": config.download.samples_per_shard,
    }


def run_selection(inputs: list[dict], layout: IngestLayout, config: IngestConfig, progress: Progress) -> dict:
    """Choose the rows to download, or reuse the selection already in `layout` if it was made the same way."""
    record_path = layout.path("selection", "selection.json")
    wanted = fingerprint(inputs, config)
    earlier = earlier_selection(layout, record_path, wanted)
    if earlier is not None:
        progress(f"ingest: selection: reusing {earlier['selected']} rows chosen earlier ({record_path})")
        return earlier

    started = time.perf_counter()
    paths = [entry["path"] for entry in inputs]
    units = select.plan_units(paths, config.rows_per_work_unit)
    progress(f"ingest: selection: {len(paths)} metadata file(s), {len(units)} work unit(s)")
    counts, candidates = classify_units(units, config)
    input_rows = int(sum(unit.rows for unit in units))
    if input_rows == 0:
        raise ValueError(f"metadata {paths} holds no rows")
    chosen, dedup_counts = select.choose(candidates, config.filters.target_count)
    parts = write_chosen_parts(select.chosen_rows_by_unit(units, candidates, chosen), layout, config)
    record = {
        "fingerprint": wanted,
        "input_rows": input_rows,
        "counts": dict(sorted(counts.items())),
        **dedup_counts,
        "selected": int(chosen.sum()),
        "parts": parts,
        "selection_sha256": select.selection_digest(_selection_urls(layout, parts, config)),
    }
    write_json(record_path, record)
    report_progress({"rows_selected": record["selected"], "input_rows": input_rows}, force=True)
    progress(
        f"ingest: selection: {record['input_rows']} rows → {record['selected']} selected "
        f"({dict(counts)}, duplicate_url={dedup_counts['duplicate_url']}, "
        f"over_cap={dedup_counts['over_cap']}) "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return record


def earlier_selection(layout: IngestLayout, record_path: str, wanted: dict) -> dict | None:
    """The selection record an earlier run left in `layout`, if any; one made another way is an error, since
    its part files would mix with this run's."""
    if not layout.filesystem().exists(fsspec.core.url_to_fs(record_path)[1]):
        return None
    record = read_json(record_path, "selection record")
    if record["fingerprint"] != wanted:
        raise ValueError(
            f"{layout.root} already holds a selection made from other inputs or another config; "
            "use a new output folder (or delete this one) to ingest with these"
        )
    return record


def classify_units(
    units: list[select.WorkUnit], config: IngestConfig
) -> tuple[Counter[str], select.Candidates]:
    """Classify every unit in its own task; the counts per reason add up and the candidates join."""
    tasks = [_classify_task.remote(unit, config.filters, config.allow_hosts) for unit in units]
    counts: Counter[str] = Counter()
    candidates = []
    for unit_counts, unit_candidates in ray.get(tasks):
        counts.update(unit_counts)
        candidates.append(unit_candidates)
    return counts, select.Candidates.concatenate(candidates)


def write_chosen_parts(
    by_unit: list[tuple[select.WorkUnit, np.ndarray]], layout: IngestLayout, config: IngestConfig
) -> list[str]:
    """Write each unit's chosen rows to its part file, one task per unit; the part names, sorted (the order
    img2dataset reads them in, which fixes the keys)."""
    tasks = [_write_part_task.remote(unit, rows, config.filters, layout.selection) for unit, rows in by_unit]
    return sorted(ray.get(tasks))


def _selection_urls(layout: IngestLayout, parts: list[str], config: IngestConfig) -> list[str]:
    urls: list[str] = []
    for part in parts:
        with fsspec.open(layout.path("selection", part), "rb") as handle:
            urls += pq.read_table(handle, columns=[config.filters.columns.url]).column(0).to_pylist()
    return urls


def expected_shards(layout: IngestLayout, parts: list[str], samples_per_shard: int) -> int:
    # img2dataset shards each input file on its own: a partial shard closes every part file.
    total = 0
    for part in parts:
        with fsspec.open(layout.path("selection", part), "rb") as handle:
            rows = pq.ParquetFile(handle).metadata.num_rows
        total += -(-rows // samples_per_shard)
    return total


def verify_downloaded_shard(shard_id: int, config: IngestConfig, layout: IngestLayout) -> dict:
    """Verify one finished download shard, then drop its raw bytes unless configured to keep them."""
    raw = layout.path("download", f"{shard_id:0{SHARD_DIGITS}d}.parquet")
    result = verify_shard(
        raw,
        layout.images,
        layout.rejects,
        min_pixels=config.filters.min_pixels,
        max_pixels=config.verify.max_pixels,
        row_group_rows=config.verify.row_group_rows,
        records_dir=layout.verified,
    )
    if not config.verify.keep_download_shards:
        filesystem, local = fsspec.core.url_to_fs(raw)
        filesystem.rm_file(local)  # its stats JSON stays: img2dataset still sees the shard as done
    return result


_verify_task = _spread_task(verify_downloaded_shard)


def download_selection(record: dict, layout: IngestLayout, config: IngestConfig, progress: Progress) -> None:
    """Download the selection with img2dataset on Ray; every shard the selection makes must finish."""
    arguments = img2dataset_arguments(
        layout.selection,
        layout.download,
        config.download,
        config.filters.columns,
        _extra_columns(layout, record),
    )
    shards = expected_shards(layout, record["parts"], config.download.samples_per_shard)
    _, download = fsspec.core.url_to_fs(layout.download)
    if shards and len(layout.filesystem().glob(download + "/*_stats.json")) >= shards:
        # A rerun after every shard finished: img2dataset would skip them all too, after re-sharding the whole
        # selection into _tmp/ and starting a task per shard (~20 s for two shards on 2 cores).
        progress(f"ingest: download: all {shards} shard(s) downloaded earlier")
        return
    progress(f"ingest: download: {record['selected']} images in {shards} shard(s) with img2dataset on Ray")
    started = time.perf_counter()
    if record["selected"]:
        # Each image is verified as it arrives and each shard split into images/ and rejects/ by the task
        # that downloaded it; run_verification catches up on shards a killed run left unsplit.
        after_shard = functools.partial(verify_downloaded_shard, config=config, layout=layout)
        image_check = VerifyingResizer(config.filters.min_pixels, config.verify.max_pixels)
        with download_progress(layout):
            run_download(arguments, config.allow_hosts, after_shard=after_shard, image_check=image_check)
    finished = len(layout.filesystem().glob(download + "/*_stats.json"))
    if finished < shards:
        raise StageError(
            f"img2dataset finished {finished} of {shards} shards in {layout.download}; "
            "rerun the same command to download the rest"
        )
    progress(f"ingest: download: {shards} shard(s) done in {time.perf_counter() - started:.1f}s")


@contextlib.contextmanager
def download_progress(layout: IngestLayout):
    """While img2dataset runs (its tasks write each finished shard's stats), a thread sums those stats into
    progress metrics every PROGRESS_INTERVAL_S: shards done, images downloaded, images that failed."""
    stop = threading.Event()
    filesystem = layout.filesystem()
    _, download = fsspec.core.url_to_fs(layout.download)
    seen: dict[str, dict] = {}

    def report() -> None:
        for path in filesystem.glob(download + "/*_stats.json"):
            if path not in seen:
                seen[path] = json.loads(filesystem.cat_file(path))
        stats = list(seen.values())
        downloaded = sum(item.get("successes", 0) for item in stats)
        failed = sum(item.get("count", 0) for item in stats) - downloaded
        report_progress({"shards_done": len(stats), "images_downloaded": downloaded, "images_failed": failed},
                        force=True)  # fmt: skip

    def watch() -> None:
        while not stop.wait(PROGRESS_INTERVAL_S):
            with contextlib.suppress(Exception):  # a half-written stats file: next time
                report()

    watcher = threading.Thread(target=watch, name="ingest-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        with contextlib.suppress(Exception):
            report()


def _extra_columns(layout: IngestLayout, record: dict) -> list[str]:
    if not record["parts"]:
        return []
    with fsspec.open(layout.path("selection", record["parts"][0]), "rb") as handle:
        return pq.ParquetFile(handle).schema_arrow.names


def discard_damaged_shards(layout: IngestLayout, progress: Progress) -> None:
    """Undo the verification of every shard whose images/ or rejects/ file is missing or has another size
    than its record says (one listing per folder, nothing read): its files and record go, and its download
    stats too when the raw shard is gone, so that img2dataset downloads it again (it skips shards with
    stats) and verification splits it again. The other shards stay as they are."""
    filesystem = layout.filesystem()
    sizes = {folder: file_sizes(layout.path(folder)) for folder in ("images", "rejects", "download")}
    records = {}
    for path in filesystem.glob(fsspec.core.url_to_fs(layout.verified)[1] + "/*.json"):
        records[path.rsplit("/", 1)[-1].removesuffix(".json")] = json.loads(filesystem.cat_file(path))
    for stats in sorted(sizes["download"]):
        if not stats.endswith("_stats.json"):
            continue
        stem = stats.removesuffix("_stats.json")
        name, record = f"{stem}.parquet", records.get(stem)
        if record is not None:
            damaged = [relative for relative, file in record["files"].items()
                       if sizes[relative.split("/")[0]].get(name) != file["bytes"]]  # fmt: skip
        else:  # not verified yet, or verified before records existed: only a missing images file is known
            damaged = [] if name in sizes["images"] or name in sizes["download"] else [f"images/{name}"]
        if not damaged:
            continue
        for folder, file in (("images", name), ("rejects", name), ("verified", f"{stem}.json")):
            local = fsspec.core.url_to_fs(layout.path(folder, file))[1]
            if filesystem.exists(local):
                filesystem.rm_file(local)
        again = "verifying it again"
        if name not in sizes["download"]:  # the raw shard was dropped once verified
            filesystem.rm_file(fsspec.core.url_to_fs(layout.path("download", stats))[1])
            again = "downloading it again"
        damage = ", ".join(damaged)
        progress(f"ingest: shard {name}: {damage} missing or resized since it was verified; {again}")


def recorded_shard_files(layout: IngestLayout, outcomes: Outcomes) -> dict:
    """The manifest's shard_files: every shard's images/ and rejects/ records from verified/; the files of
    shards verified before records existed are hashed now, by Ray tasks where the data is."""
    filesystem = layout.filesystem()
    records = {}
    for path in filesystem.glob(fsspec.core.url_to_fs(layout.verified)[1] + "/*.json"):
        records.update(json.loads(filesystem.cat_file(path))["files"])
    wanted = [f"{folder}/{shard['name']}" for shard in outcomes.shards for folder in ("images", "rejects")]
    unrecorded = [relative for relative in wanted if relative not in records]
    found = ray.get([_record_task.remote(layout.path(relative)) for relative in unrecorded])
    records.update(zip(unrecorded, found))
    return shard_files(STAGE, {relative: records[relative] for relative in wanted})


def unverified_shards(layout: IngestLayout) -> tuple[list[int], int]:
    """(ids of the downloaded shards not yet split into images/ and rejects/, how many are split)."""
    filesystem = layout.filesystem()
    _, download = fsspec.core.url_to_fs(layout.download)
    _, images = fsspec.core.url_to_fs(layout.images)
    done = {path.rsplit("/", 1)[-1] for path in filesystem.glob(images + "/*.parquet")}
    todo = []
    for stats in sorted(filesystem.glob(download + "/*_stats.json")):
        name = stats.rsplit("/", 1)[-1].removesuffix("_stats.json") + ".parquet"
        if name not in done:
            todo.append(int(name.removesuffix(".parquet")))
    return todo, len(done)


def run_verification(layout: IngestLayout, config: IngestConfig, progress: Progress) -> None:
    """Verify the downloaded shards a killed run left unverified, one task per shard."""
    todo, done = unverified_shards(layout)
    progress(f"ingest: verification: {len(todo)} shard(s) left to verify, {done} verified")
    if not todo:
        return
    started = time.perf_counter()
    results = ray.get([_verify_task.remote(shard_id, config, layout) for shard_id in todo])
    kept = sum(result["kept"] for result in results)
    rejected = sum(result["rejected"] for result in results)
    report_progress({"verified_kept": kept, "verified_rejected": rejected}, force=True)
    progress(
        f"ingest: verification: kept {kept}, rejected {rejected} in {time.perf_counter() - started:.1f}s"
    )


@dataclass(frozen=True)
class Outcomes:
    """What the verified shards hold: every key seen (none may be lost or doubled), and why rows were not
    kept."""

    kept_keys: list[str]
    reject_keys: list[str]
    reasons: Counter[tuple[str, str]]  # (stage, reason) → rows
    shards: list[dict]  # {"name", "kept", "rejected"} per shard, as the manifest lists them


def collect_outcomes(layout: IngestLayout) -> Outcomes:
    """Per-shard kept/rejected counts, reject reasons, and every key seen."""
    filesystem = layout.filesystem()
    _, images = fsspec.core.url_to_fs(layout.images)
    _, rejects = fsspec.core.url_to_fs(layout.rejects)
    kept_keys: list[str] = []
    reject_keys: list[str] = []
    reasons: Counter[tuple[str, str]] = Counter()
    shards = []
    for path in sorted(filesystem.glob(images + "/*.parquet")):
        name = path.rsplit("/", 1)[-1]
        with filesystem.open(path, "rb") as handle:
            keys = pq.read_table(handle, columns=["key"]).column(0).to_pylist()
        with filesystem.open(f"{rejects}/{name}", "rb") as handle:
            table = pq.read_table(handle, columns=["key", "stage", "reason"]).to_pydict()
        kept_keys += keys
        reject_keys += table["key"]
        reasons.update(zip(table["stage"], table["reason"]))
        shards.append({"name": name, "kept": len(keys), "rejected": len(table["key"])})
    return Outcomes(kept_keys, reject_keys, reasons, shards)


def build_manifest(
    inputs: list[dict],
    source: dict | None,
    config: IngestConfig,
    record: dict,
    outcomes: Outcomes,
    started: float,
) -> dict:
    """The manifest: inputs, config, code version, counts and shards; "unbalanced" with its problems when the
    shards do not account for every input row."""
    counts = build_counts(
        record["input_rows"],
        record["counts"],
        record["duplicate_url"],
        record["over_cap"],
        outcomes.reasons,
        len(outcomes.kept_keys),
    )
    manifest = {
        **manifest_header(MANIFEST_VERSION),
        "inputs": inputs,
        "source": source,
        "config": config.to_dict(),
        "counts": counts,
        "selection": {
            "rows": record["selected"],
            "sha256": record["selection_sha256"],
            "parts": record["parts"],
        },
        "kept_keys_sha256": select.selection_digest(sorted(outcomes.kept_keys)),
        "shards": outcomes.shards,
        "layout": {"images": "images/*.parquet", "rejects": "rejects/*.parquet"},
        "seconds": round(time.perf_counter() - started, 1),
    }
    problems = accounting_problems(record["selected"], outcomes, counts)
    if problems:
        manifest.update(status="unbalanced", problems=["ingest accounting failed", *problems])
    return manifest


def accounting_problems(selected: int, outcomes: Outcomes, counts: dict) -> list[str]:
    """Why the shards do not account for the selection: keys lost or doubled, counts that do not add up."""
    all_keys = outcomes.kept_keys + outcomes.reject_keys
    duplicate_keys = len(all_keys) - len(set(all_keys))
    problems = []
    if duplicate_keys or len(all_keys) != selected:
        problems.append(f"{len(all_keys)} keys in shards ({duplicate_keys} duplicated), {selected} selected")
    try:
        check_counts(counts)
    except StageError as error:
        problems.append(str(error))
    return problems
