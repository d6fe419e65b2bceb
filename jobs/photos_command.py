"""`infgen photos`: the held-out real photographs that scikit-image ships, written as PNG files into one
folder: the real-photograph source of `infgen evaluate --images-dir`.

    infgen photos --output PHOTOS
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.context import RunContext
from jobs.options import option


@dataclass(frozen=True, kw_only=True)
class PhotosOptions:
    output: str = option(help="folder the photographs are written to (local or fsspec URL)")


def run_photos_command(options: PhotosOptions, context: RunContext) -> dict:
    from pipelines.photos.stage import run_photos

    return run_photos(options.output, tracking=context.tracking())
