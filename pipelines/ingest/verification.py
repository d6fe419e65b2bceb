"""Verification: decode every downloaded image and check its real size; metadata sizes are often wrong.

`verify_image` is the per-image rule. `VerifyingResizer` applies it inside img2dataset's download loop, in
place of img2dataset's Resizer, so each image is decoded while the shard's other images are still arriving
(as img2dataset's own OpenCV decode is) and the original bytes are kept. `verify_shard` then splits one raw
shard into kept images (`images/NNNNN.parquet`) and rejects with their reasons (`rejects/NNNNN.parquet`, no
bytes), so that every row of the shard lands in exactly one of the two; a success row that was not verified
in flight (its size is missing) is decoded there. Each file's sha256 and size are taken as it is written and
kept in `verified/NNNNN.json` (pipelines/ingest/layout.py), which the manifest's `shard_files` collects.
"""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.common.image_policy import UndecodableImage, load_checked, open_checked
from pipelines.common.shard_integrity import write_parquet
from pipelines.ingest.accounting import download_failure_reason

IMAGE_COLUMN = "image"
# img2dataset stores the bytes it fetched in a column named after encode_format, whatever their format.
RAW_IMAGE_COLUMN = "jpg"
REJECT_COLUMNS = ["key", "url", "stage", "reason", "detail"]
VERIFICATION_FAILED = "verification failed: "  # prefix of img2dataset's error_message for our rejects


def verify_image(data: bytes | None, min_pixels: int, max_pixels: int) -> tuple[str, int, int, str]:
    """(reason or "", width, height, format). The large-image policy (pipelines/common/image_policy.py): the
    declared size is checked against `max_pixels` (at most the policy's limit) before any pixel is decoded,
    then every pixel is decoded, as the later stages will."""
    try:
        with open_checked(data, max_pixels) as image:
            width, height, kind = image.width, image.height, image.format or ""
            load_checked(image)  # the full decode: truncated and corrupt data fail here
    except UndecodableImage as error:
        return error.reason, *error.size, ""
    if width * height <= min_pixels:
        return "too_few_pixels_actual", width, height, kind
    return "", width, height, kind


class VerifyingResizer:
    """Called like img2dataset's Resizer: `(image stream, bboxes) → (bytes, width, height, original_width,
    original_height, error)`. Returns the original bytes and real size, or the reason as the error."""

    def __init__(self, min_pixels: int, max_pixels: int):
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    def __call__(self, image_stream, blurring_bbox_list=None):
        data = image_stream.read()
        reason, width, height, _ = verify_image(data, self.min_pixels, self.max_pixels)
        if reason:
            return None, None, None, None, None, VERIFICATION_FAILED + reason
        return data, width, height, width, height, None


def _image_format(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:  # header only
        return (image.format or "").lower()


def verify_shard(
    raw_path: str,
    images_dir: str,
    rejects_dir: str,
    min_pixels: int,
    max_pixels: int,
    row_group_rows: int = 64,
    records_dir: str | None = None,
) -> dict:
    """Verify one raw shard; returns {"shard", "kept", "rejected"}. Writes rejects first, images last, so
    the images shard's presence marks the shard done (resume checks for it); then, with `records_dir`, the
    two files' records ({"shard", "kept", "rejected", "files": {"images/…", "rejects/…"}}) there."""
    filesystem, path = fsspec.core.url_to_fs(raw_path)
    with filesystem.open(path, "rb") as handle:
        raw = pq.read_table(handle)
    # img2dataset writes rows as its threads finish; key order makes the output the same on every run.
    raw = raw.sort_by("key")
    name = path.rsplit("/", 1)[-1]
    columns = raw.column_names
    status = raw.column("status").to_pylist()
    messages = raw.column("error_message").to_pylist()
    data = raw.column(RAW_IMAGE_COLUMN).to_pylist()
    keys, urls = raw.column("key").to_pylist(), raw.column("url").to_pylist()  # img2dataset names it url

    widths_in_flight = raw.column("width").to_pylist() if "width" in columns else [None] * raw.num_rows
    heights_in_flight = raw.column("height").to_pylist() if "height" in columns else [None] * raw.num_rows
    rejects = {column: [] for column in REJECT_COLUMNS}
    kept_rows, widths, heights, formats = [], [], [], []
    for index in range(raw.num_rows):
        message = messages[index] or ""
        if status[index] == "success" and widths_in_flight[index] is not None:
            kept_rows.append(index)  # verified by VerifyingResizer while downloading
            widths.append(widths_in_flight[index])
            heights.append(heights_in_flight[index])
            formats.append(_image_format(data[index]))
            continue
        if status[index] == "success":
            reason, width, height, kind = verify_image(data[index], min_pixels, max_pixels)
            stage, detail = "verification", f"{width}x{height}" if width else ""
            if not reason:
                kept_rows.append(index)
                widths.append(width)
                heights.append(height)
                formats.append(kind.lower())
                continue
        elif message.startswith(VERIFICATION_FAILED):
            stage, reason, detail = "verification", message.removeprefix(VERIFICATION_FAILED), ""
        else:
            stage, reason, detail = "download", download_failure_reason(message), message
        for column, value in zip(REJECT_COLUMNS, (keys[index], urls[index], stage, reason, detail)):
            rejects[column].append(value)

    dropped = ("width", "height", "original_width", "original_height", "status", "error_message")
    kept = raw.take(np.asarray(kept_rows, dtype=np.int64)).drop_columns([c for c in dropped if c in columns])
    kept = kept.rename_columns([IMAGE_COLUMN if c == RAW_IMAGE_COLUMN else c for c in kept.column_names])
    kept = kept.append_column("width", pa.array(widths, pa.int32()))
    kept = kept.append_column("height", pa.array(heights, pa.int32()))
    kept = kept.append_column("format", pa.array(formats, pa.string()))
    reject_table = pa.table({c: pa.array(v, pa.string()) for c, v in rejects.items()})

    out_fs, images_root = fsspec.core.url_to_fs(images_dir)
    _, rejects_root = fsspec.core.url_to_fs(rejects_dir)
    files = {f"rejects/{name}": write_parquet(reject_table, out_fs, f"{rejects_root}/{name}",
                                              row_group_size=row_group_rows),
             f"images/{name}": write_parquet(kept, out_fs, f"{images_root}/{name}",
                                             row_group_size=row_group_rows)}  # fmt: skip
    result = {"shard": name, "kept": kept.num_rows, "rejected": reject_table.num_rows}
    if records_dir is not None:
        _, records_root = fsspec.core.url_to_fs(records_dir)
        record = f"{records_root}/{name.removesuffix('.parquet')}.json"
        out_fs.pipe_file(record, json.dumps({**result, "files": files}).encode())
    return result
