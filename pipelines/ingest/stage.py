"""The ingest stage: metadata → selection (Ray Data) → img2dataset on Ray → verification (Ray Data) →
manifest.

Every step is resumable: the selection is reused when its fingerprint matches, img2dataset skips finished
shards, and verification skips shards whose `images/` file exists. Rerunning the same command after a crash
finishes the job; nothing finished is redone and keys never change.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Callable

import fsspec
import numpy as np
import pyarrow.parquet as pq
import ray

from pipelines.common.errors import StageError
from pipelines.common.files import absolute, code_version, file_sha256, read_json, resolve_inputs, write_json
from pipelines.common.run_lock import RunLock
from pipelines.common.stage_output import finish_stage
from pipelines.common.tracking import StageTracking
from pipelines.ingest import selection as select
from pipelines.ingest.accounting import build_counts, check_counts
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.download import SHARD_DIGITS, img2dataset_arguments, run_download
from pipelines.ingest.layout import IngestLayout
from pipelines.ingest.verification import VerifyingResizer, verify_shard

MANIFEST_VERSION = 1
Progress = Callable[[str], None]


def _one(batch: dict) -> dict:
    """Work items travel through Ray Data as one JSON string per row (nested lists stay intact)."""
    return json.loads(str(batch["item"][0]))


def _items(items: list[dict]) -> ray.data.Dataset:
    return ray.data.from_items(
        [{"item": json.dumps(item)} for item in items], override_num_blocks=max(1, len(items))
    )


def _classify_batch(batch: dict, filters, allow_hosts) -> dict:
    result = select.classify_unit(_one(batch), filters, tuple(allow_hosts))
    reasons, counts = list(result["counts"]), list(result["counts"].values())
    rows = len(result["row"])
    return {
        "reason": np.array(reasons + [""] * rows, dtype=object),
        "count": np.array(counts + [1] * rows, dtype=np.int64),
        "file_index": np.concatenate([np.full(len(reasons), -1), result["file_index"]]).astype(np.int64),
        "row": np.concatenate([np.full(len(reasons), -1), result["row"]]).astype(np.int64),
        "order": np.concatenate([np.zeros(len(reasons), np.uint64), result["order"]]),
        "digest_high": np.concatenate([np.zeros(len(reasons), np.uint64), result["digest"][:, 0]]),
        "digest_low": np.concatenate([np.zeros(len(reasons), np.uint64), result["digest"][:, 1]]),
    }


def _write_batch(batch: dict, filters, directory) -> dict:
    item = _one(batch)
    written = select.write_unit_selection(item["unit"], np.asarray(item["rows"]), filters, directory)
    return {"part": np.array([written["part"]]), "rows": np.array([written["rows"]])}


def _checksum_batch(batch: dict) -> dict:
    path = _one(batch)["path"]
    return {"path": np.array([path]), "sha256": np.array([file_sha256(path)])}


def input_checksums(paths: list[str]) -> dict[str, str]:
    rows = (
        _items([{"path": p} for p in paths])
        .map_batches(_checksum_batch, batch_size=1, batch_format="numpy")
        .take_all()
    )
    return {row["path"]: row["sha256"] for row in rows}


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
    filesystem = layout.filesystem()
    if filesystem.exists(fsspec.core.url_to_fs(record_path)[1]):
        record = read_json(record_path, "selection record")
        if record["fingerprint"] != wanted:
            raise ValueError(
                f"{layout.root} already holds a selection made from other inputs or another config; "
                "use a new output folder (or delete this one) to ingest with these"
            )
        progress(f"ingest: selection: reusing {record['selected']} rows chosen earlier ({record_path})")
        return record

    started = time.perf_counter()
    paths = [entry["path"] for entry in inputs]
    units = select.plan_units(paths, config.rows_per_work_unit)
    progress(f"ingest: selection: {len(paths)} metadata file(s), {len(units)} work unit(s)")
    classified = _items([{**u} for u in units]).map_batches(
        _classify_batch,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"filters": config.filters, "allow_hosts": config.allow_hosts},
    )
    batches = list(classified.iter_batches(batch_format="numpy", batch_size=None))
    if not batches:
        raise ValueError(f"metadata {paths} holds no rows")
    merged = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    summary = merged["row"] < 0
    counts = Counter()
    for reason, count in zip(merged["reason"][summary], merged["count"][summary]):
        counts[str(reason)] += int(count)
    candidates = {
        "file_index": merged["file_index"][~summary],
        "row": merged["row"][~summary],
        "order": merged["order"][~summary].astype(np.uint64),
        "digest": np.stack([merged["digest_high"][~summary], merged["digest_low"][~summary]], axis=1).astype(
            np.uint64
        ),
    }
    chosen, dedup_counts = select.choose(candidates, config.filters.target_count)

    by_unit = []
    chosen_file, chosen_row = candidates["file_index"][chosen], candidates["row"][chosen]
    for unit in units:
        first = unit["first_row"]
        mask = (
            (chosen_file == unit["file_index"]) & (chosen_row >= first) & (chosen_row < first + unit["rows"])
        )
        if mask.any():
            by_unit.append({"unit": unit, "rows": np.sort(chosen_row[mask]).tolist()})
    written = (
        _items(by_unit)
        .map_batches(
            _write_batch,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"filters": config.filters, "directory": layout.selection},
        )
        .take_all()
        if by_unit
        else []
    )
    parts = sorted(row["part"] for row in written)
    urls = _selection_urls(layout, parts, config)
    record = {
        "fingerprint": wanted,
        "input_rows": int(sum(u["rows"] for u in units)),
        "counts": dict(sorted(counts.items())),
        **dedup_counts,
        "selected": int(chosen.sum()),
        "parts": parts,
        "selection_sha256": select.selection_digest(urls),
    }
    write_json(record_path, record)
    progress(
        f"ingest: selection: {record['input_rows']} rows → {record['selected']} selected "
        f"({dict(counts)}, duplicate_url={dedup_counts['duplicate_url']}, "
        f"over_cap={dedup_counts['over_cap']}) "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return record


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
    )
    if not config.verify.keep_download_shards:
        filesystem, local = fsspec.core.url_to_fs(raw)
        filesystem.rm_file(local)  # its stats JSON stays: img2dataset still sees the shard as done
    return result


def _verify_batch(batch: dict, config: IngestConfig, layout: IngestLayout) -> dict:
    result = verify_downloaded_shard(_one(batch)["shard_id"], config, layout)
    return {key: np.array([value]) for key, value in result.items()}


def run_verification(layout: IngestLayout, config: IngestConfig, progress: Progress) -> None:
    filesystem = layout.filesystem()
    _, download = fsspec.core.url_to_fs(layout.download)
    _, images = fsspec.core.url_to_fs(layout.images)
    done = {p.rsplit("/", 1)[-1] for p in filesystem.glob(images + "/*.parquet")}
    todo = []
    for stats in sorted(filesystem.glob(download + "/*_stats.json")):
        name = stats.rsplit("/", 1)[-1].removesuffix("_stats.json") + ".parquet"
        if name not in done:
            todo.append({"shard_id": int(name.removesuffix(".parquet"))})
    progress(f"ingest: verification: {len(todo)} shard(s) left to verify, {len(done)} verified")
    if not todo:
        return
    started = time.perf_counter()
    results = (
        _items(todo)
        .map_batches(
            _verify_batch, batch_size=1, batch_format="numpy", fn_kwargs={"config": config, "layout": layout}
        )
        .take_all()
    )
    kept, rejected = sum(int(r["kept"]) for r in results), sum(int(r["rejected"]) for r in results)
    progress(
        f"ingest: verification: kept {kept}, rejected {rejected} in {time.perf_counter() - started:.1f}s"
    )


def collect_outcomes(layout: IngestLayout) -> dict:
    """Per-shard kept/rejected counts, reject reasons, and every key seen (none may be lost or doubled)."""
    filesystem = layout.filesystem()
    _, images = fsspec.core.url_to_fs(layout.images)
    _, rejects = fsspec.core.url_to_fs(layout.rejects)
    kept_keys: list[str] = []
    reject_keys: list[str] = []
    reasons: Counter = Counter()
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
    return {"kept_keys": kept_keys, "reject_keys": reject_keys, "reasons": reasons, "shards": shards}


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
        checksums = input_checksums(paths)
        inputs = [{"path": p, "sha256": checksums[p]} for p in paths]
        record = run_selection(inputs, layout, config, progress)

        arguments = img2dataset_arguments(
            layout.selection,
            layout.download,
            config.download,
            config.filters.columns,
            _extra_columns(layout, record),
        )
        shards = expected_shards(layout, record["parts"], config.download.samples_per_shard)
        progress(
            f"ingest: download: {record['selected']} images in {shards} shard(s) with img2dataset on Ray"
        )
        download_started = time.perf_counter()
        if record["selected"]:
            # Each image is verified as it arrives and each shard split into images/ and rejects/ by the
            # task that downloaded it; run_verification catches up on shards a killed run left unsplit.
            after_shard = functools.partial(verify_downloaded_shard, config=config, layout=layout)
            image_check = VerifyingResizer(config.filters.min_pixels, config.verify.max_pixels)
            run_download(arguments, config.allow_hosts, after_shard=after_shard, image_check=image_check)
        _, download = fsspec.core.url_to_fs(layout.download)
        finished = len(layout.filesystem().glob(download + "/*_stats.json"))
        if finished < shards:
            raise StageError(
                f"img2dataset finished {finished} of {shards} shards in {layout.download}; "
                "rerun the same command to download the rest"
            )
        progress(f"ingest: download: {shards} shard(s) done in {time.perf_counter() - download_started:.1f}s")
        run_verification(layout, config, progress)

        outcomes = collect_outcomes(layout)
        all_keys = outcomes["kept_keys"] + outcomes["reject_keys"]
        counts = build_counts(
            record["input_rows"],
            record["counts"],
            record["duplicate_url"],
            record["over_cap"],
            outcomes["reasons"],
            len(outcomes["kept_keys"]),
        )
        duplicate_keys = len(all_keys) - len(set(all_keys))
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "status": "complete",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "code_version": code_version(),
            "inputs": inputs,
            "source": source,
            "config": config.to_dict(),
            "counts": counts,
            "selection": {
                "rows": record["selected"],
                "sha256": record["selection_sha256"],
                "parts": record["parts"],
            },
            "kept_keys_sha256": select.selection_digest(sorted(outcomes["kept_keys"])),
            "shards": outcomes["shards"],
            "layout": {"images": "images/*.parquet", "rejects": "rejects/*.parquet"},
            "seconds": round(time.perf_counter() - started, 1),
        }
        problems = []
        if duplicate_keys or len(all_keys) != record["selected"]:
            problems.append(
                f"{len(all_keys)} keys in shards ({duplicate_keys} duplicated), {record['selected']} selected"
            )
        try:
            check_counts(counts)
        except StageError as error:
            problems.append(str(error))
        if problems:
            manifest.update(status="unbalanced", problems=["ingest accounting failed", *problems])
        finish_stage("ingest", layout.root, manifest, tracking, progress)
    progress(
        f"ingest: kept {counts['buckets']['kept']} of {counts['input_rows']} rows; manifest {layout.manifest}"
    )
    return manifest


def _extra_columns(layout: IngestLayout, record: dict) -> list[str]:
    if not record["parts"]:
        return []
    with fsspec.open(layout.path("selection", record["parts"][0]), "rb") as handle:
        return pq.ParquetFile(handle).schema_arrow.names
