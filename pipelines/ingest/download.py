"""Download the selection with img2dataset on Ray.

img2dataset runs its reader and logger here, on the driver, and one Ray task per shard of
`samples_per_shard` rows (`distributor="ray"`; docs/dependencies.md, "img2dataset"), through our distributor
below, which adds the connection-time address guard and shard retries. Its incremental mode skips shards whose
`NNNNN_stats.json` exists, which is what makes a killed run resumable: the rerun redoes only unfinished
shards under the same keys, because the selection (its input) is byte-for-byte the same.

Bytes are stored as fetched (`disable_all_reencoding`): nothing is resized or re-encoded, the original file
is kept whatever its format, and the only decode happens in verification, behind the decompression-bomb
guard (img2dataset's own OpenCV decode has none).
"""

from __future__ import annotations

import contextlib
import importlib

from pipelines.common.signals import sigint_handler_kept
from pipelines.ingest.config import DownloadConfig
from pipelines.ingest.filters import ColumnMap

SHARD_DIGITS = 5  # shard files are NNNNN.parquet

# img2dataset refuses these as extra column names (they are its own output columns).
_RESERVED = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status"}
_RESERVED |= {"error_message", "exif", "md5", "sha256", "sha512"}


def img2dataset_arguments(
    selection_dir: str, output_dir: str, config: DownloadConfig, columns: ColumnMap, extra_columns: list[str]
) -> dict:
    """Keyword arguments for `img2dataset.download` (kept separate so the benchmark runs the same call)."""
    extra = [c for c in extra_columns if c not in (columns.url, columns.caption) and c not in _RESERVED]
    return {
        "url_list": selection_dir,
        "output_folder": output_dir,
        "input_format": "parquet",
        "url_col": columns.url,
        "caption_col": columns.caption if columns.caption in extra_columns else None,
        "save_additional_columns": extra,
        "output_format": "parquet",
        "resize_mode": "no",
        "disable_all_reencoding": True,
        "number_sample_per_shard": config.samples_per_shard,
        "oom_shard_count": SHARD_DIGITS,
        "distributor": "ray",
        "processes_count": 1,  # ignored by the ray distributor; one task per shard
        "thread_count": config.thread_count,
        "timeout": config.timeout_seconds,
        "retries": config.retries,
        "incremental_mode": "incremental",
        "compute_hash": "sha256",
        "extract_exif": False,
        "user_agent_token": config.user_agent_token,
        # An empty list means "ignore X-Robots-Tag" to img2dataset; None means its default opt-out list.
        "disallowed_header_directives": None if config.honour_opt_out else [],
        "enable_wandb": False,
    }


def _download_shard(downloader, shard, allow_hosts: tuple[str, ...], attempts: int, after_shard):
    from pipelines.ingest.address_guard import install_guarded_opener

    install_guarded_opener(allow_hosts)  # per task: cheap, and a reused worker may come from another job
    for _ in range(attempts):
        finished, _ = downloader(shard)  # img2dataset reports a failed shard instead of raising
        if finished:
            break
    if finished and after_shard is not None:
        after_shard(shard[0])  # verify while other shards still download: the decode overlaps the network
    return finished


def guarded_ray_distributor(
    allow_hosts: tuple[str, ...], shard_retries: int, after_shard=None, image_check=None
):
    """img2dataset's distributor interface, on Ray: one task per shard, like img2dataset's own, plus what
    that one lacks: the connection-time address guard in each worker (redirects and DNS answers are checked
    where the connection is made), retries of a failed shard, `image_check` in place of img2dataset's
    Resizer (called the same way, on every fetched image), and `after_shard(shard_id)` run in the same
    task once the shard is written."""
    import ray

    task = ray.remote(_download_shard).options(max_retries=shard_retries)  # retries a lost worker

    def distributor(processes_count, downloader, reader, subjob_size, max_shard_retry):
        del processes_count, subjob_size, max_shard_retry  # parallelism is Ray's; retries are set above
        if image_check is not None:
            downloader.resizer = image_check
        refs = [
            task.remote(downloader, shard, allow_hosts, shard_retries + 1, after_shard) for shard in reader
        ]
        ray.get(refs)

    return distributor


@contextlib.contextmanager
def _distributor_for_ray(distributor):
    # img2dataset.download picks its distributor by name from its module's globals and offers no hook to run
    # code in its Ray workers, so "ray" is pointed at ours for the duration of the call (img2dataset pinned).
    # (the package re-exports a function named `main`, so the module is fetched by its full name)
    module = importlib.import_module("img2dataset.main")
    previous = module.ray_distributor
    module.ray_distributor = distributor
    try:
        yield
    finally:
        module.ray_distributor = previous


def run_download(
    arguments: dict, allow_hosts: tuple[str, ...], shard_retries: int = 2, after_shard=None, image_check=None
) -> None:
    import img2dataset  # heavy (opencv, albumentations); only the download needs it

    # img2dataset.download installs a SIGINT handler that cleans up and calls sys.exit(0): its exit is turned
    # back into the KeyboardInterrupt it was, and the caller's handler is put back (pipelines/signals.py).
    try:
        with (
            sigint_handler_kept(),
            _distributor_for_ray(
                guarded_ray_distributor(tuple(allow_hosts), shard_retries, after_shard, image_check)
            ),
        ):
            img2dataset.download(**arguments)
    except SystemExit as exit_request:
        if exit_request.code in (0, None):
            raise KeyboardInterrupt("download interrupted") from exit_request
        raise
