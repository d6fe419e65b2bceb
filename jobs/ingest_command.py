"""`infgen ingest`: LAION-style metadata → verified >2 MP images in Parquet shards, with a manifest.

    infgen ingest --metadata META.parquet [META_DIR ...] --output OUT      real metadata (any fsspec URL)
    infgen ingest --embedded 240 --output OUT                              the embedded loopback source
    infgen ingest --regenerate OUT/manifest.json --output OUT2             rebuild a past ingest

Rerunning the same command after a crash resumes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

from jobs.context import RunContext
from jobs.options import option

# Only the standard library at import: `infgen --help` builds this command's options and must stay instant.

# The embedded source differs from real metadata only in where it lives and how fast it answers.
EMBEDDED_SAMPLES_PER_SHARD = 25
EMBEDDED_TIMEOUT_SECONDS = 2.0
EMBEDDED_SLOW_SECONDS = 4.0  # the slow rows answer after the timeout: they are counted as timeouts


@dataclass(frozen=True, kw_only=True)
class IngestOptions:
    metadata: list[str] = option([], help="metadata Parquet files or folders (local or fsspec URLs)")
    embedded: int | None = option(None, metavar="ROWS", help="generate ROWS rows served on 127.0.0.1")
    regenerate: str | None = option(
        None, metavar="MANIFEST", help="rebuild the ingest a manifest.json describes"
    )
    target_count: int | None = option(None, help="cap on selected rows (default 5,000,000; embedded: all)")
    min_pixels: int | None = option(None, help="WIDTH·HEIGHT must exceed this (default 2,000,000)")
    min_aesthetic: float | None = option(None, help="aesthetic score threshold (default 5.0)")
    samples_per_shard: int | None = option(None, help="images per Parquet shard (default 1000)")
    allow_host: list[str] = option([], repeat=True, help="host exempt from the address guard (repeatable)")
    seed: int = option(0, help="selection seed (and the embedded source's)")
    output: str = option(help="output folder (local or fsspec URL)")

    def __post_init__(self):
        sources = (
            ("--metadata", self.metadata),
            ("--embedded", self.embedded),
            ("--regenerate", self.regenerate),
        )
        given = [name for name, value in sources if value not in (None, [])]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one source: --metadata, --embedded or --regenerate (got {given or 'none'})"
            )
        if self.embedded is not None and self.embedded < 1:
            raise ValueError(f"--embedded must be ≥ 1 row, got {self.embedded}")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be ≥ 1, got {self.samples_per_shard}")


def build_config(args: IngestOptions, embedded: bool):
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
        config = dataclasses.replace(
            config, download=dataclasses.replace(config.download, samples_per_shard=args.samples_per_shard)
        )
    return config


@contextlib.contextmanager
def embedded_source(output: str, rows: int, seed: int, port: int | None = None):
    """Serve the embedded source. Its metadata lives under OUTPUT/source and is reused on reruns, served on
    the port its URLs name."""
    from pipelines.common.files import read_json, write_json
    from pipelines.ingest.embedded_source import EmbeddedImageServer, make_metadata
    from pipelines.ingest.layout import IngestLayout

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


def run_ingest_command(args: IngestOptions, context: RunContext) -> dict:
    from pipelines.common.files import resolve_inputs
    from pipelines.ingest.regenerate import check_inputs, compare, config_of, load_manifest
    from pipelines.ingest.stage import run_ingest

    tracking = context.tracking()
    if args.regenerate:
        original = load_manifest(args.regenerate)
        paths = check_inputs(original, args.regenerate)
        config = config_of(original)
        source = original.get("source")
        context.connect_ray()
        if source and source.get("kind") == "embedded":
            # The URLs name the original port; serve there again, from the recorded metadata file.
            with _serve_recorded(source):
                rebuilt = run_ingest(paths, args.output, config, source=source, tracking=tracking)
        else:
            rebuilt = run_ingest(paths, args.output, config, source=source, tracking=tracking)
        compare(original, rebuilt, print)
        return rebuilt
    # Everything the user typed is checked before a cluster is started or joined.
    config = build_config(args, embedded=args.embedded is not None)
    if args.metadata:
        resolve_inputs(args.metadata, "metadata")
    context.connect_ray()
    if args.embedded is not None:
        with embedded_source(args.output, args.embedded, args.seed) as (metadata_path, source):
            return run_ingest([metadata_path], args.output, config, source=source, tracking=tracking)
    return run_ingest(args.metadata, args.output, config, tracking=tracking)


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
