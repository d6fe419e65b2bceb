"""A folder of ordinary image files (real photographs, e.g. `infgen photos`) as an evaluation source: each
image gives crop pairs exactly as a held-out image does (pipelines/common/reconstruction.py), and is scored
against its own ground truth.

A size is scored only on the images whose centred crop is at least that large: a truth made by upscaling a
smaller photograph is not ground truth, so such an image is left out at that size, and the table says which
and why. Every file is decoded on the driver before anything is written, so an unreadable one fails naming
itself.
"""

from __future__ import annotations

import hashlib

import fsspec
from PIL import Image

from pipelines.common.crops import largest_crop
from pipelines.common.image_policy import UndecodableImage, decode_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def folder_images(folder: str, max_images: int) -> list[dict]:
    """[{"path", "key" (the file name), "height", "width", "sha256"}] of the image files directly in `folder`,
    by name, at most `max_images`; a clear error naming the folder (missing, not a folder, no images) or the
    file (not decodable)."""
    filesystem, root = fsspec.core.url_to_fs(folder)
    if not filesystem.isdir(root):
        raise ValueError(f"--images-dir {folder}: not a folder (or not readable)")
    try:
        entries = sorted(filesystem.ls(root, detail=False))
    except OSError as error:
        raise ValueError(f"--images-dir {folder}: cannot list it ({error})") from None
    names = [
        entry for entry in entries if entry.lower().endswith(IMAGE_SUFFIXES) and filesystem.isfile(entry)
    ]
    if not names:
        raise ValueError(
            f"--images-dir {folder}: no image files in it (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    protocol = "" if folder.startswith("/") or "://" not in folder else folder.split("://", 1)[0] + "://"
    return [describe(f"{protocol}{name}", filesystem.cat_file(name)) for name in names[:max_images]]


def describe(path: str, payload: bytes) -> dict:
    """The file's record, after decoding it fully under the project's large-image policy (a truncated, corrupt
    or over-200 MP file fails here, named with the policy's reason)."""
    try:
        width, height = decode_rgb(payload).size
    except UndecodableImage as error:
        raise ValueError(f"image file {path} cannot be decoded: {error}") from None
    return {"path": path, "key": path.rsplit("/", 1)[-1], "height": height, "width": width,
            "sha256": hashlib.sha256(payload).hexdigest()}  # fmt: skip


def read_folder_images(refs: list[dict]) -> list[Image.Image]:
    """RGB Pillow images of `folder_images` records (decoded as `describe` checked them)."""
    images = []
    for ref in refs:
        with fsspec.open(ref["path"], "rb") as handle:
            images.append(decode_rgb(handle.read()))
    return images


def fits(ref: dict, size: tuple[int, int]) -> bool:
    """Whether the image's largest centred crop with the aspect of `size` is at least `size`: its truth at
    that size is then a downscale (or the crop itself), never an upscale."""
    crop_height, crop_width = largest_crop(ref["height"], ref["width"], size[1] / size[0])
    return crop_height >= size[0] and crop_width >= size[1]


def split_by_fit(refs: list[dict], size: tuple[int, int]) -> tuple[list[dict], list[dict]]:
    """(the images scored at `size`, the images too small for it)."""
    return [ref for ref in refs if fits(ref, size)], [ref for ref in refs if not fits(ref, size)]
