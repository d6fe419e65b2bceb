"""`infgen ingest`: LAION-style metadata → verified >2 MP images in Parquet shards, with a manifest.

    infgen ingest --metadata META.parquet [META_DIR ...] --output OUT      real metadata (any fsspec URL)
    infgen ingest --embedded 240 --output OUT                              the embedded loopback source
    infgen ingest --regenerate OUT/manifest.json --output OUT2             rebuild a past ingest

Rerunning the same command after a crash resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

from jobs.stage_tracking import add_tracking_arguments, manifest_tracker

# Only the standard library at import: `infgen --help` builds this parser and must stay instant.

# The embedded source differs from real metadata only in where it lives and how fast it answers.
EMBEDDED_SAMPLES_PER_SHARD = 25
EMBEDDED_TIMEOUT_SECONDS = 2.0
EMBEDDED_SLOW_SECONDS = 4.0  # the slow rows answer after the timeout: they are counted as timeouts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--metadata", nargs="+", help="metadata Parquet files or folders (local or fsspec URLs)"
    )
    source.add_argument("--embedded", type=int, metavar="ROWS", help="generate ROWS rows served on 127.0.0.1")
    source.add_argument(
        "--regenerate", metavar="MANIFEST", help="rebuild the ingest a manifest.json describes"
    )
    parser.add_argument("--output", required=True, help="output folder (local or fsspec URL)")
    parser.add_argument(
        "--target-count", type=int, help="cap on selected rows (default 5,000,000; embedded: all)"
    )
    parser.add_argument("--min-pixels", type=int, help="WIDTH·HEIGHT must exceed this (default 2,000,000)")
    parser.add_argument("--min-aesthetic", type=float, help="aesthetic score threshold (default 5.0)")
    parser.add_argument("--samples-per-shard", type=int, help="images per Parquet shard (default 1000)")
    parser.add_argument(
        "--allow-host", action="append", default=[], help="host exempt from the address guard"
    )
    parser.add_argument("--seed", type=int, default=0, help="selection seed (and the embedded source's)")
    parser.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else embedded)")
    add_tracking_arguments(parser)


def build_config(args: argparse.Namespace, embedded: bool):
    from pipelines.ingest.config import DownloadConfig, IngestConfig

    config = IngestConfig()
    filters = {"seed": args.seed}
    if embedded:
        filters["target_count"] = None
        config = dataclasses.replace(
            config,
            allow_hosts=("127.0.0.1",),
            download=DownloadConfig(
                samples_per_shard=EMBEDDED_SAMPLES_PER_SHARD,
                thread_count=16,
                timeout_seconds=EMBEDDED_TIMEOUT_SECONDS,
            ),
        )
    for name, value in (("target_count", args.target_count), ("min_pixels", args.min_pixels)):
        if value is not None:
            filters[name] = value
    if args.min_aesthetic is not None:
        filters["min_aesthetic"] = args.min_aesthetic
    config = dataclasses.replace(
        config,
        filters=dataclasses.replace(config.filters, **filters),
        allow_hosts=tuple(sorted({*config.allow_hosts, *args.allow_host})),
    )
    if args.samples_per_shard is not None:
        if args.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be ≥ 1, got {args.samples_per_shard}")
        config = dataclasses.replace(
            config, download=dataclasses.replace(config.download, samples_per_shard=args.samples_per_shard)
        )
    return config


@contextlib.contextmanager
def embedded_source(output: str, rows: int, seed: int, port: int | None = None):
    """Serve the embedded source. Its metadata lives under OUTPUT/source and is reused on reruns, served on
    the port its URLs name."""
    from pipelines.ingest.embedded_source import EmbeddedImageServer, make_metadata
    from pipelines.ingest.layout import IngestLayout
    from pipelines.ingest.manifest import read_json, write_json

    layout = IngestLayout(output)
    record_path, metadata_path = (
        layout.path("source", "source.json"),
        layout.path("source", "metadata.parquet"),
    )
    filesystem = layout.filesystem()
    record = read_json(record_path, "embedded source record") if filesystem.exists(record_path) else None
    if record and (record["rows"], record["seed"]) != (rows, seed):
        raise ValueError(
            f"{output} holds an embedded source of {record['rows']} rows (seed {record['seed']}); "
            f"asked for {rows} (seed {seed}): use another --output"
        )
    port = port if port is not None else (record["port"] if record else 0)
    try:
        server = EmbeddedImageServer(port=port, slow_seconds=EMBEDDED_SLOW_SECONDS)
    except OSError as error:
        raise ValueError(
            f"cannot serve the embedded source on 127.0.0.1:{port}, which its URLs name: {error}"
        ) from None
    with server:
        if record is None:
            filesystem.makedirs(layout.path("source"), exist_ok=True)
            frame = make_metadata(rows, server.base_url, seed=seed)
            frame.attrs = {}  # the kinds are test knowledge, not metadata
            frame.to_parquet(metadata_path, index=False)
            record = {"kind": "embedded", "rows": rows, "seed": seed, "port": server.server_address[1]}
            write_json(record_path, record)
        print(f"ingest: embedded source: {rows} rows served at {server.base_url}")
        yield metadata_path, record


def run_ingest_command(args: argparse.Namespace) -> dict:
    from jobs.ray_session import connect_ray
    from pipelines.ingest.regenerate import check_inputs, compare, config_of, load_manifest
    from pipelines.ingest.stage import run_ingest

    track = manifest_tracker(args, "ingest")
    if args.regenerate:
        original = load_manifest(args.regenerate)
        paths = check_inputs(original, args.regenerate)
        config = config_of(original)
        source = original.get("source")
        connect_ray(args.ray_address)
        if source and source.get("kind") == "embedded":
            # The URLs name the original port; serve there again, from the recorded metadata file.
            with _serve_recorded(source):
                rebuilt = run_ingest(paths, args.output, config, source=source, tracking=track)
        else:
            rebuilt = run_ingest(paths, args.output, config, source=source, tracking=track)
        compare(original, rebuilt, print)
        return rebuilt
    # Everything the user typed is checked before a cluster is started or joined.
    if args.embedded is not None and args.embedded < 1:
        raise ValueError(f"--embedded must be ≥ 1 row, got {args.embedded}")
    config = build_config(args, embedded=args.embedded is not None)
    if args.metadata:
        from pipelines.ingest.manifest import resolve_inputs

        resolve_inputs(args.metadata)
    connect_ray(args.ray_address)
    if args.embedded is not None:
        with embedded_source(args.output, args.embedded, args.seed) as (metadata_path, source):
            return run_ingest([metadata_path], args.output, config, source=source, tracking=track)
    return run_ingest(args.metadata, args.output, config, tracking=track)


@contextlib.contextmanager
def _serve_recorded(source: dict):
    from pipelines.ingest.embedded_source import EmbeddedImageServer

    try:
        server = EmbeddedImageServer(port=source["port"], slow_seconds=EMBEDDED_SLOW_SECONDS)
    except OSError as error:
        raise ValueError(
            f"cannot serve the embedded source again on 127.0.0.1:{source['port']}: {error}"
        ) from None
    with server:
        yield server
