"""The evaluation stage: decode every latent source at every size with InfGen and with the stock VAE decoder
+ resize, score both against held-out ground truth on a Ray Data actor pool, and write the plug-in gains
table.

Work is cut into chunks (pipelines/evaluation/chunks.py); each chunk's features and per-image metrics land in
one part file, so a rerun scores only the chunks that are missing. The table is recomputed from the part files
every time: the numbers never depend on which run scored which chunk.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import ray

from pipelines.common.actor_pool import gpus_per_worker, map_with_actor_pool
from pipelines.common.files import absolute, file_sha256
from pipelines.common.holdout import held_out_images
from pipelines.common.latent_record import read_latent_record
from pipelines.common.run_lock import RunLock
from pipelines.common.stage_output import claim_output, finish_stage, manifest_header
from pipelines.common.tracking import StageTracking, report_progress
from pipelines.evaluation.chunks import (
    HELD_OUT,
    IMAGE_FOLDER,
    IMAGE_SOURCES,
    Chunk,
    Unit,
    plan_chunks,
    size_name,
)
from pipelines.evaluation.config import EvalConfig
from pipelines.evaluation.image_folder import folder_images, split_by_fit
from pipelines.evaluation.mlflow_logging import table_logger
from pipelines.evaluation.scoring import REFERENCE, ChunkScorer, load_part
from pipelines.evaluation.sources import diffusers_latents, load_latent_file
from pipelines.evaluation.table import concatenate, gains_rows, markdown, substitute_notes

MANIFEST_VERSION = 1
RECORD_NAME = "evaluation.json"


@dataclass(frozen=True)
class LatentGeometry:
    """What the held-out images are encoded with, and what every latent source must look like."""

    vae: str | None  # None: the embedded offline substitute
    input_side: int
    latent_channels: int


def latent_geometry(
    decoder: str, latents: str | None, vae: str | None, input_side: int | None
) -> LatentGeometry:
    """From the latent stage's record when there is one (--vae / --input-side may only repeat it); for an
    ingest kept apart for evaluation, from --vae and --input-side, with the decoder's latent channels."""
    if latents is not None:
        record = read_latent_record(latents)
        for option, given, recorded in (
            ("--vae", vae, record.vae),
            ("--input-side", input_side, record.input_side),
        ):
            if given is not None and given != recorded:
                raise ValueError(f"{option} {given}: the latent stage at {latents} used {recorded}; leave "
                                 f"{option} out to take it from there")  # fmt: skip
        return LatentGeometry(record.vae, record.input_side, record.latent_channels)
    if input_side is None:
        raise ValueError("without --latents, say how the held-out images are encoded: --input-side (the "
                         "encoder input side the decoder was trained on) and --vae (default: the embedded "
                         "substitute)")  # fmt: skip
    if input_side < 1:
        raise ValueError(f"--input-side must be ≥ 1, got {input_side}")
    from infgen.checkpoint import read_config

    return LatentGeometry(vae, input_side, read_config(decoder).latent_channels)


def run_evaluation(
    decoder: str,
    images: str,
    output: str,
    config: EvalConfig,
    latents: str | None = None,
    latent_files: dict[str, str] | None = None,
    pipelines: dict[str, str] | None = None,
    progress: Callable[[str], None] = print,
    tracking: StageTracking | None = None,
    vae: str | None = None,
    input_side: int | None = None,
    images_dir: str | None = None,
) -> dict:
    """Score `decoder` on the held-out images of `images` (those the latent stage at `latents` kept out;
    every image without it), on the image files of `images_dir` (full-reference metrics only) and on the
    named latent files and diffusers pipelines; returns the manifest."""
    decoder, images, output = absolute(decoder), absolute(images), absolute(output)
    latents = absolute(latents) if latents else None
    weights = Path(decoder) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"--decoder {decoder}: no model.safetensors (expected an infgen.save directory)"
        )
    latent_files = {name: absolute(path) for name, path in (latent_files or {}).items()}
    pipelines = {name: absolute(path) for name, path in (pipelines or {}).items()}
    for name in [*latent_files, *pipelines]:
        if name in IMAGE_SOURCES or "/" in name or not name:
            raise ValueError(f"source name {name!r} is reserved or not a plain name")
    geometry = latent_geometry(
        decoder, latents, vae, input_side
    )  # bad input fails before anything is written
    config = config.at_input_side(geometry.input_side)
    refs = held_out_images(images, latents, config.max_images)
    folder_refs = folder_images(absolute(images_dir), config.max_images) if images_dir else None
    needed = config.precision_recall_k + 1  # k-NN radii need k other points; covariances need 2
    if len(refs) < needed:
        raise ValueError(
            f"only {len(refs)} held-out image(s) in {images}; the metrics need at least {needed} "
            "(hold more out in the latent stage, or evaluate a separate ingest without --latents)"
        )
    sources = {}
    for name, path in latent_files.items():
        # Validated on the driver before anything is written, so a bad file fails with its name (not inside
        # an actor) and, once mended, the same command runs into the same output folder.
        sources[name] = (path, min(len(load_latent_file(path, geometry.latent_channels)), config.max_images))
        if sources[name][1] < needed:
            raise ValueError(
                f"latent file {path} ({name}): {sources[name][1]} latents, need at least {needed}"
            )
    filesystem, root = fsspec.core.url_to_fs(output)
    filesystem.makedirs(root, exist_ok=True)
    out = output.rstrip("/")
    started = time.perf_counter()
    with RunLock(f"{out}/_LOCK"):
        inputs = {
            "decoder": decoder,
            "decoder_sha256": file_sha256(str(weights)),
            "images": images,
            "held_out": [ref["key"] for ref in refs],
            "latent_files": {},
            "pipelines": pipelines,
            "latent_geometry": {
                "vae": geometry.vae,
                "input_side": geometry.input_side,
                "latent_channels": geometry.latent_channels,
            },
        }
        for name, path in latent_files.items():
            inputs["latent_files"][name] = {"path": path, "sha256": file_sha256(path)}
        if folder_refs is not None:
            inputs["images_dir"] = {"path": absolute(images_dir),
                                    "files": {ref["key"]: ref["sha256"] for ref in folder_refs}}  # fmt: skip
        claim_output(out, RECORD_NAME, {"config": config.to_dict(), "inputs": inputs}, config.RESOURCE_FIELDS,
                     "an evaluation of another decoder, other inputs or another config")  # fmt: skip
        for name, directory in pipelines.items():
            sampled = f"{out}/sources/{name}.npy"
            if not filesystem.exists(f"{root}/sources/{name}.npy"):
                progress(
                    f"evaluate: sampling {config.max_images} latents from the diffusers pipeline {directory}"
                )
                # A GPU when the cluster has one: without num_gpus Ray hides the GPUs and it samples on CPU.
                sampling = _sample.options(num_gpus=gpus_per_worker())
                task = sampling.remote(directory, config.max_images, config.seed, config.sample_batch)
                array = ray.get(task)
                buffer = io.BytesIO()
                np.save(buffer, array)
                filesystem.makedirs(f"{root}/sources", exist_ok=True)
                filesystem.pipe_file(f"{root}/sources/{name}.npy", buffer.getvalue())
            sources[name] = (
                sampled,
                min(len(load_latent_file(sampled, geometry.latent_channels)), config.max_images),
            )
        too_small = folder_sizes_skipped(folder_refs, config.sizes, progress) if folder_refs else {}
        units_at = source_units(refs, folder_refs, sources)
        chunks = plan_chunks(out, config.sizes, config.chunk_images, units_at)
        todo = [chunk for chunk in chunks if not filesystem.exists(fsspec.core.url_to_fs(chunk.part)[1])]
        folder = f"{len(folder_refs)} image(s) from {images_dir}, " if folder_refs else ""
        progress(f"evaluate: {len(refs)} held-out images, {folder}{len(sources)} latent source(s), "
                 f"{len(config.sizes)} size(s): {len(chunks)} chunks, {len(todo)} to score")  # fmt: skip
        if todo:
            _score(todo, decoder, geometry, config, progress, started)
        folder_record = None
        if folder_refs is not None:
            folder_record = {"path": absolute(images_dir), "images": len(folder_refs), "too_small": too_small}
        manifest = _aggregate(out, chunks, config, inputs, time.perf_counter() - started, folder_record)
        metrics, extra = table_logger(manifest, out)
        finish_stage("evaluate", out, manifest, tracking, progress, metrics=metrics, extra=extra)
    progress(f"evaluate: plug-in gains table in {out}/plugin_gains.md")
    return manifest


@ray.remote
def _sample(directory: str, count: int, seed: int, batch_size: int) -> np.ndarray:
    from infgen.devices import default_device

    # The progress lines reach the driver's log through Ray's worker-output forwarding.
    return diffusers_latents(directory, count, seed, default_device(), batch_size, progress=print)


def folder_sizes_skipped(folder_refs: list[dict], sizes, progress) -> dict[str, list[str]]:
    """{size name: ["name (W×H)", ...]} of the folder's images too small for a size (no upscaled truths),
    said aloud as they are found."""
    skipped = {}
    for size in sizes:
        _, small = split_by_fit(folder_refs, tuple(size))
        if small:
            skipped[size_name(size)] = [f"{ref['key']} ({ref['width']}x{ref['height']})" for ref in small]
            names = ", ".join(skipped[size_name(size)])
            progress(f"evaluate: {IMAGE_FOLDER} at {size_name(size)}: skipping {names}: smaller than "
                     f"{size_name(size)} after a centred crop (no upscaled truths)")  # fmt: skip
    return skipped


def source_units(refs: list[dict], folder_refs: list[dict] | None, sources: dict[str, tuple[str, int]]):
    """units_at(size) for plan_chunks: the held-out images, the folder's images that fit the size, and the
    latent sources ({name: (file, count)})."""

    def units_at(size) -> list[Unit]:
        units = [Unit(HELD_OUT, len(refs), refs=refs)]
        if folder_refs is not None:
            fitting, _ = split_by_fit(folder_refs, size)
            if fitting:
                units.append(Unit(IMAGE_FOLDER, len(fitting), refs=fitting, full_reference_only=True))
        units += [Unit(name, count, file=path) for name, (path, count) in sources.items()]
        return units

    return units_at


def threads_per_actor(workers: int) -> int:
    """Torch threads per scoring actor on CPU: the cluster's cores shared among the actors (an actor reserves
    one CPU in Ray's books, but decoding and Inception scale with threads; one thread per actor left a
    2-core machine half idle with the embedded preset's one actor). The actor caps it at its node's cores."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)


def _score(todo: list[Chunk], decoder: str, geometry: LatentGeometry, config: EvalConfig, progress,
           started: float) -> None:  # fmt: skip
    rows = map_with_actor_pool([{"index": index} for index in range(len(todo))], ChunkScorer, config.workers,
                               {"config": config, "decoder": decoder, "vae": geometry.vae,
                                "input_side": geometry.input_side, "chunks": todo,
                                "threads": threads_per_actor(config.workers)})  # fmt: skip
    cpu_seconds = 0.0
    for done, row in enumerate(rows, start=1):
        part = str(row["part"]).rsplit("/parts/", 1)[-1]
        cpu_seconds += float(row["cpu_seconds"])
        report_progress({"chunks_scored": done, "chunks": len(todo)})
        progress(f"evaluate: {done}/{len(todo)} chunks ({part}, {int(row['images'])} images, "
                 f"{float(row['cpu_seconds']):.0f} CPU s; {time.perf_counter() - started:.0f}s, "
                 f"{cpu_seconds:.0f} CPU s so far)")  # fmt: skip


def _aggregate(out: str, chunks: list[Chunk], config: EvalConfig, inputs: dict, seconds: float,
               folder: dict | None) -> dict:  # fmt: skip
    by_unit: dict[tuple, list] = {}
    meta = None
    for chunk in chunks:
        groups, meta = load_part(chunk.part)
        by_unit.setdefault((chunk.source, chunk.size), []).append(groups)
    results = {unit: concatenate(parts) for unit, parts in by_unit.items()}
    reference = {size: groups[REFERENCE] for (source, size), groups in results.items() if source == HELD_OUT}
    for groups in results.values():
        groups.pop(REFERENCE, None)
    rows = gains_rows(results, reference, config)
    problems = [f"{row['source']} {row['size']} {row['decoder']}: {name} is not finite"
                for row in rows for name in ("fid", "fidp")
                if name in row and not np.isfinite(row[name])]  # fmt: skip
    notes = substitute_notes(
        meta["extractor"], meta["extractor_is_substitute"], meta["lpips_trunk_pretrained"]
    )
    notes += folder_notes(folder)
    filesystem, root = fsspec.core.url_to_fs(out)
    filesystem.pipe_file(f"{root}/plugin_gains.md", markdown(rows, notes).encode())
    filesystem.pipe_file(f"{root}/plugin_gains.json", json.dumps(rows, indent=2).encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=sorted({key for row in rows for key in row}))
    writer.writeheader()
    writer.writerows(rows)
    filesystem.pipe_file(f"{root}/plugin_gains.csv", text.getvalue().encode())
    return {
        **manifest_header(MANIFEST_VERSION, "complete" if not problems else "invalid", problems),
        "config": config.to_dict(),
        "inputs": {k: v for k, v in inputs.items() if k != "held_out"},
        "held_out_images": len(inputs["held_out"]),
        "image_folder": folder,
        "feature_extractor": meta["extractor"],
        "feature_extractor_is_substitute": meta["extractor_is_substitute"],
        "lpips_trunk_pretrained": meta["lpips_trunk_pretrained"],
        "rows": rows,
        "counts": {"chunks": len(chunks), "rows": len(rows)},
        "seconds": round(seconds, 1),
        "layout": {
            "table": ["plugin_gains.md", "plugin_gains.json", "plugin_gains.csv"],
            "grids": "grids/SOURCE_HxW.png",
            "parts": "parts/SOURCE/HxW/NNNNN.npz",
        },  # fmt: skip
        "published": {"table": "plugin_gains.md"},
    }


def folder_notes(folder: dict | None) -> list[str]:
    """The table's footer lines about the image folder: what it is scored on, and what was left out."""
    if folder is None:
        return []
    notes = [f"{IMAGE_FOLDER}: {folder['images']} image(s) from {folder['path']}, each against its own "
             "ground truth: PSNR/SSIM/LPIPS only (a handful of photographs is no distribution for FID and "
             "kin)."]  # fmt: skip
    for size, skipped in folder["too_small"].items():
        notes.append(f"{IMAGE_FOLDER} {size}: left out {', '.join(skipped)}: smaller than {size} after a "
                     "centred crop, and an upscaled truth is not ground truth.")  # fmt: skip
    return notes
