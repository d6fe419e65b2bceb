"""Latent stage benchmark: samples/s of the whole stage (Ray Data actor pool, one frozen VAE per actor,
Parquet latent shards, stats and manifest) against a bare single-process torch loop doing the same
per-sample work (decode, crop, resize, encode with per-sample noise) over the same images with the same
encoder, in the same run. Target: stage / bare ≥ 0.9.

    infra/isolated.sh .venv/bin/python bench/latents.py [--images 144] [--preset stage1]

The images are > 2 MP JPEGs written straight into ingest-format shards (no download needed). The encoder is
the embedded offline substitute unless --vae names a real one.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.report import emit  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    # 12 shards, 6 per actor: the actors' fixed start-up (~6 s here: process, imports, VAE) weighs on the
    # ratio as it would not on a real run of thousands of shards; the report gives it apart.
    parser.add_argument("--images", type=int, default=144)
    parser.add_argument("--per-shard", type=int, default=12)
    parser.add_argument("--preset", choices=["stage1", "embedded"], default="stage1")
    parser.add_argument("--vae", help="diffusers AutoencoderKL directory (default: the embedded substitute)")
    parser.add_argument("--output", help="also write the markdown report to this file")
    return parser.parse_args(argv)


def write_image_shards(directory: Path, count: int, per_shard: int) -> None:
    from infgen.substitutes.synthetic import make_image

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for shard in range(0, count, per_shard):
        rows = collections.defaultdict(list)
        for index in range(shard, min(count, shard + per_shard)):
            height, width = int(rng.integers(1400, 1700)), int(rng.integers(1500, 2400))
            small = make_image(index, height // 4, width // 4)
            buffer = io.BytesIO()
            Image.fromarray(small).resize((width, height), Image.BILINEAR).save(buffer, "JPEG", quality=90)
            for name, value in (("key", f"{index:09d}"), ("image", buffer.getvalue()), ("width", width),
                                ("height", height)):  # fmt: skip
                rows[name].append(value)
        pq.write_table(pa.table(rows), directory / f"{shard // per_shard:05d}.parquet")


def bare_loop(images: Path, config) -> int:
    """One process, both cores to torch: the same per-sample work, no Ray and no Parquet output."""
    from pipelines.common.vae_source import load_frozen_vae
    from pipelines.latents.encode import _encode_batch, _samples

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    vae, _ = load_frozen_vae(config.vae)
    samples = 0
    for path in sorted(images.glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "image", "width", "height"])
        batch = []
        for item in _samples(table, config, collections.Counter()):
            batch.append(item)
            if len(batch) == config.batch_size:
                samples += len(_encode_batch(vae, batch))
                batch = []
        if batch:
            samples += len(_encode_batch(vae, batch))
    return samples


def shard_timeline(latents: Path, stage_start: float, stage_end: float) -> dict:
    """Where the stage's wall time went, from the shards' stats: start-up before each actor's first shard,
    encoding, idle after its last shard (the tail while other actors finish)."""
    import json

    spans = collections.defaultdict(list)
    for path in latents.glob("*_stats.json"):
        stats = json.loads(path.read_text())
        spans[stats["worker"], stats["pid"]].append((stats["started"], stats["finished"]))
    startup = [min(s for s, _ in shards) - stage_start for shards in spans.values()]
    busy = [sum(f - s for s, f in shards) for shards in spans.values()]
    idle_tail = [stage_end - max(f for _, f in shards) for shards in spans.values()]
    return {"actors": len(spans), "startup": startup, "busy": busy, "idle_tail": idle_tail,
            "shards": [len(shards) for shards in spans.values()]}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    from jobs.ray_session import connect_ray
    from pipelines.common.vae_source import load_frozen_vae
    from pipelines.latents.config import EMBEDDED, LatentConfig
    from pipelines.latents.stage import run_latents

    config = EMBEDDED if args.preset == "embedded" else LatentConfig()
    config = dataclasses.replace(config, vae=args.vae)
    load_frozen_vae(config.vae)  # trains and caches the substitute once, outside both timings
    scratch = Path(tempfile.mkdtemp(prefix="bench-latents-"))
    try:
        write_image_shards(scratch / "images", args.images, args.per_shard)
        connect_ray()
        import ray

        cores = ray.cluster_resources().get("CPU", 0)
        started = time.perf_counter()
        bare_samples = bare_loop(scratch / "images", config)
        bare_seconds = time.perf_counter() - started
        import resource

        driver_cpu = resource.getrusage(resource.RUSAGE_SELF)
        started, stage_start = time.perf_counter(), time.time()
        manifest = run_latents(
            str(scratch / "images"), str(scratch / "latents"), config, progress=lambda _: None
        )
        stage_seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        driver_cpu_seconds = after.ru_utime + after.ru_stime - driver_cpu.ru_utime - driver_cpu.ru_stime
        timeline = shard_timeline(scratch / "latents", stage_start, time.time())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stage_samples = manifest["counts"]["samples"]
    bare_rate, stage_rate = bare_samples / bare_seconds, stage_samples / stage_seconds
    ratio = stage_rate / bare_rate
    startup = min(timeline["startup"], default=0.0)  # from the first actor's first shard on
    steady_rate = stage_samples / max(stage_seconds - startup, 1e-9)
    lines = [
        f"Latent stage, {args.images} images (> 2 MP JPEGs) in shards of {args.per_shard}, preset "
        f"`{args.preset}` ({config.policy.input_side}² encoder input, "
        f"{config.samples_per_image} samples/image), "
        f"VAE: {manifest['vae']}, Ray with {cores:.0f} CPUs ({config.encoders} actors), "
        f"load {os.getloadavg()[0]:.1f}",
        "",
        "| run | samples | seconds | samples/s |",
        "|---|---|---|---|",
        f"| bare torch loop, one process | {bare_samples} | {bare_seconds:.1f} | {bare_rate:.1f} |",
        f"| latent stage (whole) | {stage_samples} | {stage_seconds:.1f} | {stage_rate:.1f} |",
        f"| latent stage after its actors' start-up | {stage_samples} | {stage_seconds - startup:.1f} | "
        f"{steady_rate:.1f} |",
        "",
        f"stage / bare = {ratio:.2f} (target ≥ 0.9: {'met' if ratio >= 0.9 else 'MISSED'}); the driver "
        f"process used {driver_cpu_seconds:.1f} CPU-s during the stage; after start-up "
        f"{steady_rate / bare_rate:.2f}",
        "",
        "Per actor (seconds of the stage's wall time): "
        + "; ".join(
            f"{n} shards, start-up {s:.1f}, encoding {b:.1f}, idle at the end {t:.1f}"
            for n, s, b, t in zip(
                timeline["shards"], timeline["startup"], timeline["busy"], timeline["idle_tail"]
            )  # fmt: skip
        ),
    ]
    emit(lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
