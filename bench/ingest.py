"""Ingest benchmark: images/s of the whole ingest stage (selection as Ray tasks, img2dataset on Ray through
our distributor, verification, accounting, manifest) against a plain `img2dataset.download` of the same
selected URLs from the same loopback server, measured in the same run on the same Ray cluster. Target: ratio
≥ 0.9.

    infra/isolated.sh .venv/bin/python bench/ingest.py [--rows 1200] [--rounds 2]

The embedded server renders every image once before timing (it would otherwise be the bottleneck), and an
untimed stage run warms the Ray workers' imports. Timed runs alternate (plain, stage, plain, stage, ...) and
medians are compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402
from jobs.ray_session import connect_ray  # noqa: E402
from pipelines.ingest.config import DownloadConfig, IngestConfig  # noqa: E402
from pipelines.ingest.download import img2dataset_arguments  # noqa: E402
from pipelines.ingest.embedded_source import (  # noqa: E402
    RENDER_CACHE,
    EmbeddedImageServer,
    SourceMix,
    make_metadata,
)
from pipelines.ingest.stage import run_ingest  # noqa: E402

CLEAN = SourceMix(**{field.name: 0.0 for field in dataclasses.fields(SourceMix)})  # every row an ok image


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="metadata rows (all > 2 MP images)")
    parser.add_argument("--samples-per-shard", type=int, default=50)
    parser.add_argument("--threads", type=int, default=16, help="img2dataset threads per shard task")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each; medians are compared")
    parser.add_argument("--output", help="also write the markdown report to this file")
    parser.add_argument("--verbose", action="store_true", help="print the stage's progress lines")
    args = parser.parse_args(argv)
    if not 0 < args.rows <= RENDER_CACHE:
        parser.error(
            f"--rows must be 1..{RENDER_CACHE}: the server keeps that many rendered images in memory"
        )
    args.progress = print if args.verbose else (lambda line: None)
    return args


def warm(urls: list[str], threads: int = 8) -> None:
    def fetch(url):
        with urllib.request.urlopen(url, timeout=60) as response:
            response.read()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fetch, urls))


def plain_img2dataset(selection: str, output: str, config: IngestConfig) -> int:
    """What a user would run by hand on the same selection: img2dataset's own Ray distributor, bytes kept."""
    import img2dataset

    arguments = img2dataset_arguments(selection, output, config.download, config.filters.columns, [])
    arguments.update(disable_all_reencoding=False, skip_reencode=True, save_additional_columns=None)
    img2dataset.download(**arguments)
    return sum(json.loads(path.read_text())["successes"] for path in Path(output).glob("*_stats.json"))


def main(argv=None) -> int:
    args = parse_args(argv)
    connect_ray()
    import ray

    cores = ray.cluster_resources().get("CPU", 0)
    scratch = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    config = IngestConfig(
        allow_hosts=("127.0.0.1",),
        download=DownloadConfig(samples_per_shard=args.samples_per_shard, thread_count=args.threads),
    )
    config = dataclasses.replace(config, filters=dataclasses.replace(config.filters, target_count=None))
    results = {"stage": [], "plain": []}
    try:
        with EmbeddedImageServer() as server:
            frame = make_metadata(args.rows, server.base_url, seed=0, mix=CLEAN)
            frame.attrs = {}
            metadata = scratch / "metadata.parquet"
            frame.to_parquet(metadata, index=False)
            started = time.perf_counter()
            warm(list(frame["URL"]))
            print(f"bench: server rendered {args.rows} images in {time.perf_counter() - started:.1f}s")
            # Untimed warm-up: imports in the Ray workers, and the selection the plain runs download.
            run_ingest([str(metadata)], str(scratch / "warm-up"), config, progress=args.progress)
            selection = str(scratch / "warm-up" / "selection")
            for round_index in range(args.rounds):
                output = scratch / f"plain-{round_index}"
                started = time.perf_counter()
                images = plain_img2dataset(selection, str(output), config)
                results["plain"].append((images, time.perf_counter() - started))
                output = scratch / f"stage-{round_index}"
                started = time.perf_counter()
                manifest = run_ingest([str(metadata)], str(output), config, progress=args.progress)
                results["stage"].append(
                    (manifest["counts"]["buckets"]["kept"], time.perf_counter() - started)
                )
                shutil.rmtree(scratch / f"plain-{round_index}")
                shutil.rmtree(output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rate = {name: statistics.median(n / s for n, s in runs) for name, runs in results.items()}
    ratio = rate["stage"] / rate["plain"]
    lines = [
        f"Ingest benchmark, {datetime.date.today()}: {args.rows} rows (> 2 MP JPEGs) from the embedded "
        f"server on 127.0.0.1, {args.samples_per_shard}/shard, {args.threads} threads/task, "
        f"Ray with {cores:.0f} CPUs, {platform.processor() or platform.machine()}, "
        f"load {os.getloadavg()[0]:.1f}",
        "",
        "| run | images | seconds (each run) | images/s (median) | images/s per core |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("plain", "plain `img2dataset.download`"), ("stage", "ingest stage (whole)")):
        runs = results[name]
        seconds = ", ".join(f"{s:.1f}" for _, s in runs)
        lines.append(f"| {label} | {runs[0][0]} | {seconds} | {rate[name]:.1f} | {rate[name] / cores:.1f} |")
    verdict = "met" if ratio >= 0.9 else "MISSED"
    lines += ["", f"stage / plain = {ratio:.2f} (target ≥ 0.9: {verdict})"]
    emit(lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
