"""The photographs stage: the held-out real photographs that installed packages ship
(infgen/substitutes/photographs.py, `HELD_OUT`: never used to train anything) written as PNG files into one
folder, the real-photograph source the evaluation reads with --images-dir.

PNG, whatever the package ships (the rocket is a JPEG): decoding once and storing losslessly means every later
read sees the same pixels. The manifest vouches for each file's bytes, so a workflow notices a changed one.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from PIL import Image

from infgen.substitutes.photographs import HELD_OUT, load_photograph, photograph_path
from pipelines.common.files import absolute, file_sha256
from pipelines.common.run_lock import RunLock
from pipelines.common.stage_output import claim_output, finish_stage, manifest_header
from pipelines.common.tracking import StageTracking

MANIFEST_VERSION = 1
RECORD_NAME = "photos.json"
MLFLOW_EXPERIMENT = "infgen-photos"


def photograph_file(name: str) -> str:
    return f"{name}.png"


def write_png(array, path: str) -> None:
    """Written whole, then renamed: a PNG that exists is complete."""
    import fsspec

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    filesystem, local = fsspec.core.url_to_fs(path)
    filesystem.pipe_file(f"{local}.tmp", buffer.getvalue())
    filesystem.mv(f"{local}.tmp", local)


def run_photos(output: str, tracking: StageTracking | None = None,
               progress: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Write every held-out photograph into `output` as NAME.png; returns the manifest."""
    import fsspec

    output = absolute(output).rstrip("/")
    photographs = {photo.name: photograph_path(photo) for photo in HELD_OUT}  # a missing one fails here
    filesystem, root = fsspec.core.url_to_fs(output)
    filesystem.makedirs(root, exist_ok=True)
    started = time.perf_counter()
    with RunLock(f"{output}/_LOCK"):
        config = {"photographs": sorted(photographs), "mlflow_experiment": MLFLOW_EXPERIMENT}
        inputs = {name: {"path": path, "sha256": file_sha256(path)} for name, path in photographs.items()}
        claim_output(output, RECORD_NAME, {"config": config, "inputs": inputs},
                     what="other photographs")  # fmt: skip
        written = []
        for photo in HELD_OUT:
            array = load_photograph(photo)
            write_png(array, f"{output}/{photograph_file(photo.name)}")
            written.append({"name": photo.name, "file": photograph_file(photo.name), "package": photo.package,
                            "height": int(array.shape[0]), "width": int(array.shape[1])})  # fmt: skip
            progress(f"photos: {photograph_file(photo.name)} ({array.shape[1]}x{array.shape[0]}, from "
                     f"{photo.package})")  # fmt: skip
        manifest = {
            **manifest_header(MANIFEST_VERSION),
            "config": config,
            "inputs": inputs,
            "photographs": written,
            "counts": {"photographs": len(written)},
            "checksums": {item["file"]: file_sha256(f"{output}/{item['file']}") for item in written},
            "seconds": round(time.perf_counter() - started, 1),
        }
        finish_stage("photos", output, manifest, tracking, progress)
    progress(f"photos: {len(written)} held-out photographs in {output}")
    return manifest
