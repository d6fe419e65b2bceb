"""The latent stage: ingest image shards → latent shards, on a Ray Data actor pool (one frozen VAE each).

One latent shard per image shard, under the same name, so the trainer finds each sample's source image and a
rerun skips every shard whose `NNNNN_stats.json` exists and whose file still has the size recorded there (a
missing or truncated shard is encoded again, alone). The ingest's image shards are checked against its
manifest before anything is encoded. The manifest accounts for every input image: used (with
`samples_per_image` samples) or skipped with a reason, and lists every shard's sha256 and size
(`shard_files`, pipelines/common/shard_integrity.py). When the shards are done the stage completes its
record, latents.json, with the geometry every later stage reads (pipelines/common/latent_record.py).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable

import fsspec
import numpy as np
import pyarrow.parquet as pq
import ray

from pipelines.common.actor_pool import map_with_actor_pool
from pipelines.common.crops import target_sizes
from pipelines.common.files import absolute, fresh_filesystem, resolve_inputs, write_json
from pipelines.common.latent_record import RECORD_NAME, geometry, record_path
from pipelines.common.latent_shards import latent_shape, read_latents
from pipelines.common.run_lock import RunLock
from pipelines.common.shard_integrity import check_shards, file_record, file_sizes, shard_files
from pipelines.common.stage_output import claim_output, finish_stage, manifest_header
from pipelines.common.tracking import StageTracking, report_progress
from pipelines.latents.config import LatentConfig
from pipelines.latents.encode import ShardEncoder

MANIFEST_VERSION = 2  # 2: shard_files (version 1 manifests are still read: their shards are not checked)
STAGE = "latents"


def _rows(path: str) -> int:
    with fsspec.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def run_latents(
    images: str,
    output: str,
    config: LatentConfig,
    progress: Callable[[str], None] = print,
    tracking: StageTracking | None = None,
) -> dict:
    images, output = absolute(images), absolute(output)  # the actors do not share the driver's directory
    shards = resolve_inputs([images], "images")  # a missing or empty folder fails here, before any write
    image_records = check_shards(images, "latents input")  # so does a missing or truncated image shard
    inputs = [{"shard": path.rsplit("/", 1)[-1], "rows": _rows(path)} for path in shards]
    filesystem, root = fsspec.core.url_to_fs(output)
    filesystem.makedirs(root, exist_ok=True)
    out = output.rstrip("/")
    started = time.perf_counter()
    with RunLock(f"{out}/_LOCK"):
        wanted = {"config": config.to_dict(), "inputs": inputs}
        refused = "latents made from other images or another config"
        record = claim_output(out, RECORD_NAME, wanted, config.RESOURCE_FIELDS, refused)
        done = _finished_shards(filesystem, root, file_sizes(out), progress)
        todo = [path for path in shards if path.rsplit("/", 1)[-1].removesuffix(".parquet") not in done]
        progress(f"latents: {len(shards)} image shard(s), {len(todo)} to encode, {len(done)} done earlier")
        if todo:
            encoder = {"config": config, "output_dir": output, "image_records": image_records}
            rows = map_with_actor_pool([{"path": p} for p in todo], ShardEncoder, config.encoders, encoder,
                                       memory_gib=config.encoder_memory_gib)  # fmt: skip
            for encoded, row in enumerate(rows, start=1):
                stats = json.loads(row["stats"])
                report_progress({"shards_encoded": len(done) + encoded, "shards": len(shards)})
                progress(
                    f"latents: {stats['shard']}: {stats['samples']} samples from {stats['images_used']} of "
                    f"{stats['images']} images in {stats['finished'] - stats['started']:.0f}s on "
                    f"{stats['worker']} ({time.perf_counter() - started:.0f}s)"
                )
        filesystem, root = fresh_filesystem(output)  # the actors wrote the shards: forget older listings
        encoded_by = _encoded_by(filesystem, root, inputs)
        manifest = _manifest(filesystem, root, out, inputs, config, encoded_by, time.perf_counter() - started)
        if manifest["status"] == "complete":
            # Only now is the geometry known for sure (the VAE's channels and scaling come from the shards).
            write_json(record_path(out), {**record, "geometry": _geometry(out, config, *encoded_by)})
        finish_stage(STAGE, out, manifest, tracking, progress)
    progress(f"latents: {manifest['counts']['samples']} samples from {manifest['counts']['images']} images")
    return manifest


def _finished_shards(filesystem, root: str, sizes: dict[str, int], progress: Callable[[str], None]) -> set:
    """Stems of the shards a previous run finished: a stats file, and the shard beside it with the size the
    stats recorded (`sizes`: one listing). The stats of a missing or resized shard are removed, so it is
    encoded again; stats written before shards were recorded vouch for a shard that exists."""
    done = set()
    for path in sorted(filesystem.glob(f"{root}/*_stats.json")):
        stem = path.rsplit("/", 1)[-1].removesuffix("_stats.json")
        recorded = json.loads(filesystem.cat_file(path)).get("file")
        size = sizes.get(f"{stem}.parquet")
        if size is not None and (recorded is None or recorded["bytes"] == size):
            done.add(stem)
            continue
        found = "missing" if size is None else f"{size} bytes, {recorded['bytes']} when written"
        progress(f"latents: shard {stem}.parquet is {found}: encoding it again")
        filesystem.rm_file(path)
    return done


def _shard_files(out: str, records: dict[str, dict], unrecorded: list[str]) -> dict:
    """The manifest's shard_files: the records the encoders left in the stats, and for shards encoded before
    records existed, their hashes now (by Ray tasks, where the data is, not on the driver)."""
    hashing = ray.remote(file_record)
    found = ray.get([hashing.remote(f"{out}/{name}") for name in unrecorded])
    return shard_files(STAGE, {**records, **dict(zip(unrecorded, found))})


def _encoded_by(filesystem, root: str, inputs: list[dict]) -> tuple[str, tuple, tuple[float, float] | None]:
    """What the shards say about the VAE that wrote them: its label and latent shape (schema metadata), and
    its (scaling, shift) from the first shard holding a sample (None when none does)."""
    label, shape = None, None
    for entry in inputs:
        with filesystem.open(f"{root}/{entry['shard']}", "rb") as handle:
            parquet = pq.ParquetFile(handle)
            label = parquet.schema_arrow.metadata[b"vae"].decode()
            shape = latent_shape(parquet.schema_arrow)
            if parquet.metadata.num_rows:
                first = parquet.read_row_group(0, columns=["scaling_factor", "shift_factor"]).slice(0, 1)
                return label, shape, (first.column(0)[0].as_py(), first.column(1)[0].as_py())
    return label, shape, None


def _geometry(out: str, config: LatentConfig, label: str, shape: tuple, scaling) -> dict:
    """The shards' VAE facts plus the crop policy's sizes: the record's geometry."""
    if scaling is None:
        raise ValueError(f"latents in {out}: no shard holds a sample, so the VAE's scaling is unknown")
    return geometry(config.vae, label, shape, scaling[0], scaling[1], config.policy.input_side,
                    target_sizes(config.policy))  # fmt: skip


def _manifest(filesystem, root: str, out: str, inputs: list[dict], config: LatentConfig, encoded_by: tuple,
              seconds: float) -> dict:  # fmt: skip
    skipped: Counter = Counter()
    undecodable: dict[str, str] = {}
    totals = Counter()
    records, unrecorded = {}, []
    for entry in inputs:
        stem = entry["shard"].removesuffix(".parquet")
        stats = json.loads(filesystem.cat_file(f"{root}/{stem}_stats.json"))
        if "file" in stats:
            records[entry["shard"]] = stats["file"]
        else:
            unrecorded.append(entry["shard"])
        skipped.update(stats["skipped"])
        undecodable.update(stats.get("undecodable", {}))  # older stats do not list them
        totals.update(images=stats["images"], images_used=stats["images_used"], samples=stats["samples"])
    counts = {"images": totals["images"], "images_used": totals["images_used"], "skipped": dict(skipped),
              "samples": totals["samples"], "undecodable": dict(sorted(undecodable.items()))}  # fmt: skip
    problems = []
    if counts["images"] != sum(entry["rows"] for entry in inputs):
        problems.append(f"{counts['images']} images encoded, {sum(e['rows'] for e in inputs)} in the input")
    if counts["images_used"] + sum(skipped.values()) != counts["images"]:
        problems.append("used + skipped images do not add up to the input images")
    if counts["samples"] != counts["images_used"] * config.samples_per_image:
        problems.append(f"{counts['samples']} samples, expected {config.samples_per_image} per used image")
    return {
        **manifest_header(MANIFEST_VERSION, "complete" if not problems else "unbalanced", problems),
        "config": config.to_dict(),
        "vae": encoded_by[0],
        "latent_shape": list(encoded_by[1]),
        "inputs": inputs,
        "counts": counts,
        "seconds": round(seconds, 1),
        "layout": {"latents": "NNNNN.parquet", "stats": "NNNNN_stats.json", "record": RECORD_NAME},
        "shard_files": _shard_files(out, records, unrecorded),
    }


def latent_digest(output: str) -> str:
    """sha256 over every shard's latents and sample columns, in shard order: equal digests = equal latents."""
    import hashlib

    filesystem, root = fresh_filesystem(output)
    digest = hashlib.sha256()
    for path in sorted(filesystem.glob(f"{root}/*.parquet")):
        with filesystem.open(path, "rb") as handle:
            table = pq.read_table(handle)
        for column in table.column_names:
            chunk = table.column(column).combine_chunks()
            if column == "latent":
                digest.update(np.ascontiguousarray(read_latents(table)).tobytes())
            else:
                digest.update(json.dumps(chunk.to_pylist()).encode())
    return digest.hexdigest()
