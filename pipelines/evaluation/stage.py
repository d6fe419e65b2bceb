"""The evaluation stage: decode every latent source at every size with InfGen and with the stock VAE decoder
+ resize, score both against held-out ground truth on a Ray Data actor pool, and write the plug-in gains
table.

Work is cut into chunks (source × size × a few images); each chunk's features and per-image metrics land in
one part file, so a rerun scores only the chunks that are missing. The table is recomputed from the part files
every time: the numbers never depend on which run scored which chunk.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
import ray

from pipelines.actor_pool import map_with_actor_pool
from pipelines.errors import StageError
from pipelines.evaluation.config import EvalConfig
from pipelines.evaluation.scoring import REFERENCE, ChunkScorer, load_part
from pipelines.evaluation.sources import diffusers_latents, held_out_images, load_latent_file
from pipelines.evaluation.table import concatenate, gains_rows, markdown
from pipelines.ingest.manifest import RunLock, code_version, file_sha256, read_json, write_json
from pipelines.output_record import same_output
from pipelines.tracking import absolute

MANIFEST_VERSION = 1
RECONSTRUCTION = "reconstruction"


def size_name(size) -> str:
    return f"{size[0]}x{size[1]}"


def plan_items(out: str, config: EvalConfig, refs: list[dict], latent_sources: dict[str, tuple[str, int]]):
    """Work units: one per (source, size, chunk of `chunk_images`)."""
    items = []
    for size in config.sizes:
        units = [(RECONSTRUCTION, {"kind": "reconstruction"}, len(refs))]
        units += [
            (name, {"kind": "latents", "file": path}, count) for name, (path, count) in latent_sources.items()
        ]
        for source, fields, total in units:
            for start in range(0, total, config.chunk_images):
                count = min(config.chunk_images, total - start)
                item = {
                    "source": source,
                    "size": list(size),
                    "start": start,
                    "count": count,
                    **fields,
                    "part": f"{out}/parts/{source}/{size_name(size)}/{start // config.chunk_images:05d}.npz",
                    "grid": f"{out}/grids/{source}_{size_name(size)}.png",
                }
                if source == RECONSTRUCTION:
                    item["refs"] = refs[start : start + count]
                    item["keys"] = [ref["key"] for ref in item["refs"]]
                items.append(item)
    return items


def run_evaluation(
    decoder: str,
    images: str,
    output: str,
    config: EvalConfig,
    latents: str | None = None,
    latent_files: dict[str, str] | None = None,
    pipelines: dict[str, str] | None = None,
    progress: Callable[[str], None] = print,
    tracking: Callable[[dict, str], None] | None = None,
) -> dict:
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
        if name == RECONSTRUCTION or "/" in name or not name:
            raise ValueError(f"source name {name!r} is reserved or not a plain name")
    refs = held_out_images(images, latents, config.max_images)  # bad inputs fail before anything is written
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
        sources[name] = (path, min(len(load_latent_file(path, config.latent_channels)), config.max_images))
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
        }
        for name, path in latent_files.items():
            inputs["latent_files"][name] = {"path": path, "sha256": file_sha256(path)}
        wanted = json.loads(json.dumps({"config": config.to_dict(), "inputs": inputs}))  # tuples → lists
        if filesystem.exists(f"{root}/evaluation.json"):
            recorded = read_json(f"{out}/evaluation.json", "evaluation record")
            if not same_output(recorded, wanted, config.RESOURCE_FIELDS):
                raise ValueError(
                    f"{output} holds an evaluation of another decoder, other inputs or another config; "
                    "use a new output folder"
                )
        else:
            write_json(f"{out}/evaluation.json", wanted)
        for name, directory in pipelines.items():
            sampled = f"{out}/sources/{name}.npy"
            if not filesystem.exists(f"{root}/sources/{name}.npy"):
                progress(
                    f"evaluate: sampling {config.max_images} latents from the diffusers pipeline {directory}"
                )
                array = ray.get(_sample.remote(directory, config.max_images, config.seed))
                buffer = io.BytesIO()
                np.save(buffer, array)
                filesystem.makedirs(f"{root}/sources", exist_ok=True)
                filesystem.pipe_file(f"{root}/sources/{name}.npy", buffer.getvalue())
            sources[name] = (
                sampled,
                min(len(load_latent_file(sampled, config.latent_channels)), config.max_images),
            )
        items = plan_items(out, config, refs, sources)
        todo = [item for item in items if not filesystem.exists(fsspec.core.url_to_fs(item["part"])[1])]
        progress(f"evaluate: {len(refs)} held-out images, {len(sources)} other source(s), "
                 f"{len(config.sizes)} size(s): {len(items)} chunks, {len(todo)} to score")  # fmt: skip
        if todo:
            _score(todo, decoder, config, progress, started)
        manifest = _aggregate(out, items, config, inputs, time.perf_counter() - started)
        write_json(f"{out}/manifest.json", manifest)
        if manifest["status"] != "complete":
            raise StageError(f"evaluation produced invalid metrics: {manifest['problems']}")
    progress(f"evaluate: plug-in gains table in {out}/plugin_gains.md")
    if tracking is not None:
        tracking(manifest, f"{out}/manifest.json")
    return manifest


@ray.remote
def _sample(directory: str, count: int, seed: int) -> np.ndarray:
    import torch

    return diffusers_latents(directory, count, seed, "cuda" if torch.cuda.is_available() else "cpu")


def _score(todo: list[dict], decoder: str, config: EvalConfig, progress, started: float) -> None:
    rows = map_with_actor_pool([{"item": json.dumps(item)} for item in todo], ChunkScorer, config.workers,
                               {"config": config, "decoder": decoder})  # fmt: skip
    for done, row in enumerate(rows, start=1):
        result = json.loads(row["result"])
        progress(f"evaluate: {done}/{len(todo)} chunks ({result['part'].rsplit('/parts/', 1)[-1]}, "
                 f"{result['images']} images, {time.perf_counter() - started:.0f}s)")  # fmt: skip


def _aggregate(out: str, items: list[dict], config: EvalConfig, inputs: dict, seconds: float) -> dict:
    by_unit: dict[tuple, list] = {}
    meta = None
    for item in items:
        groups, meta = load_part(item["part"])
        by_unit.setdefault((item["source"], tuple(item["size"])), []).append(groups)
    results = {unit: concatenate(parts) for unit, parts in by_unit.items()}
    reference = {
        size: groups[REFERENCE] for (source, size), groups in results.items() if source == RECONSTRUCTION
    }
    for groups in results.values():
        groups.pop(REFERENCE, None)
    rows = gains_rows(results, reference, config)
    problems = [f"{row['source']} {row['size']} {row['decoder']}: {name} is not finite"
                for row in rows for name in ("fid", "fidp") if not np.isfinite(row[name])]  # fmt: skip
    extractor = meta["extractor"]
    filesystem, root = fsspec.core.url_to_fs(out)
    filesystem.pipe_file(f"{root}/plugin_gains.md", markdown(rows, extractor).encode())
    filesystem.pipe_file(f"{root}/plugin_gains.json", json.dumps(rows, indent=2).encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=sorted({key for row in rows for key in row}))
    writer.writeheader()
    writer.writerows(rows)
    filesystem.pipe_file(f"{root}/plugin_gains.csv", text.getvalue().encode())
    return {
        "manifest_version": MANIFEST_VERSION,
        "status": "complete" if not problems else "invalid",
        "problems": problems,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "config": config.to_dict(),
        "inputs": {k: v for k, v in inputs.items() if k != "held_out"},
        "held_out_images": len(inputs["held_out"]),
        "feature_extractor": extractor,
        "feature_extractor_is_substitute": meta["extractor_is_substitute"],
        "lpips_trunk_pretrained": meta["lpips_trunk_pretrained"],
        "rows": rows,
        "counts": {"chunks": len(items), "rows": len(rows)},
        "seconds": round(seconds, 1),
        "layout": {
            "table": ["plugin_gains.md", "plugin_gains.json", "plugin_gains.csv"],
            "grids": "grids/SOURCE_HxW.png",
            "parts": "parts/SOURCE/HxW/NNNNN.npz",
        },  # fmt: skip
    }
