"""Where the ingest stage keeps things under its output folder (a local path or any fsspec URL).

    OUTPUT/selection/part-FFFFF-UUUUU.parquet   chosen metadata rows (img2dataset's input)
    OUTPUT/selection/selection.json             what chose them, and the selection's counts
    OUTPUT/download/NNNNN.parquet               raw img2dataset shards (deleted once verified, by default)
    OUTPUT/download/NNNNN_stats.json            img2dataset's per-shard stats: marks a shard downloaded
    OUTPUT/images/NNNNN.parquet                 the dataset: verified images with their metadata
    OUTPUT/rejects/NNNNN.parquet                rows of a shard that were not kept, with reasons (no bytes)
    OUTPUT/verified/NNNNN.json                  the verification's record of a shard: counts, and the sha256
                                                and bytes of its images/ and rejects/ files (written last)
    OUTPUT/manifest.json                        inputs, config, code version, counts; beside the shards
    OUTPUT/_LOCK                                held while a run writes here

The manifest is not inside download/: img2dataset treats every *.json there as a finished shard's stats. The
records are not inside images/: readers take every file there for a shard (pyarrow's dataset discovery does).
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec

from pipelines.common.files import fresh_filesystem


@dataclass(frozen=True)
class IngestLayout:
    root: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def selection(self) -> str:
        return self.path("selection")

    @property
    def download(self) -> str:
        return self.path("download")

    @property
    def images(self) -> str:
        return self.path("images")

    @property
    def rejects(self) -> str:
        return self.path("rejects")

    @property
    def verified(self) -> str:
        return self.path("verified")

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")

    @property
    def lock(self) -> str:
        return self.path("_LOCK")

    def filesystem(self) -> fsspec.AbstractFileSystem:
        """The output's filesystem, its cached listings dropped: Ray workers write here (object stores)."""
        return fresh_filesystem(self.root)[0]

    def make_directories(self) -> None:
        filesystem = self.filesystem()
        for directory in (self.selection, self.download, self.images, self.rejects, self.verified):
            filesystem.makedirs(fsspec.core.url_to_fs(directory)[1], exist_ok=True)
