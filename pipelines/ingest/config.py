"""The ingest stage's typed configuration: one dataclass tree, serialised whole into the manifest.

Defaults are the full-scale run (5M images over 2 MP, LAION-Aesthetic V2 column names). The embedded default
overrides only the source, the target count and the network timing (see jobs/ingest_command.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipelines.common.image_policy import MAX_PIXELS, check_limit
from pipelines.ingest.filters import ColumnMap, FilterConfig


@dataclass(frozen=True)
class DownloadConfig:
    """img2dataset settings (docs/dependencies.md, "img2dataset"). Shards hold ~1000 >2 MP images: 0.5–2 GB
    each."""

    samples_per_shard: int = 1000
    thread_count: int = 64  # per Ray task (one task per shard, 1 CPU each)
    timeout_seconds: float = 10.0
    retries: int = 0
    user_agent_token: str | None = "infgen"
    # X-Robots-Tag opt-outs are honoured (img2dataset's default list); rows that opt out are counted.
    honour_opt_out: bool = True


@dataclass(frozen=True)
class VerifyConfig:
    # Images declaring more pixels than this are refused before decoding; at most the limit every later stage
    # decodes (pipelines/common/image_policy.py), which is the default.
    max_pixels: int = MAX_PIXELS
    keep_download_shards: bool = False  # raw img2dataset shards are deleted once verified (halves storage)
    row_group_rows: int = (
        64  # small row groups: Ray Data concatenating big binary columns overflows (ray#48042)
    )

    def __post_init__(self):
        check_limit(self.max_pixels, "ingest verify.max_pixels")


@dataclass(frozen=True)
class IngestConfig:
    filters: FilterConfig = field(default_factory=lambda: FilterConfig(target_count=5_000_000))
    download: DownloadConfig = field(default_factory=DownloadConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    # Hosts exempt from the address guard; empty for real metadata, ["127.0.0.1"] for the embedded source.
    allow_hosts: tuple[str, ...] = ()
    rows_per_work_unit: int = 200_000  # metadata rows one selection task reads (whole row groups)
    mlflow_experiment: str = "infgen-ingest"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> IngestConfig:
        """Inverse of to_dict; unknown keys are an error naming the key (a manifest from another version)."""
        filters = dict(data.get("filters", {}))
        columns = ColumnMap(**filters.pop("columns", {}))
        try:
            return cls(
                filters=FilterConfig(columns=columns, **filters),
                download=DownloadConfig(**data.get("download", {})),
                verify=VerifyConfig(**data.get("verify", {})),
                allow_hosts=tuple(data.get("allow_hosts", ())),
                **{
                    k: v for k, v in data.items() if k not in ("filters", "download", "verify", "allow_hosts")
                },
            )
        except TypeError as error:
            raise ValueError(f"ingest config does not match this version: {error}") from None
