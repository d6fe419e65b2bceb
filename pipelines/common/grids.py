"""Comparison grids a person can read: images side by side under text labels, each row followed by a
nearest-neighbour zoom of its central patch, so blur, colour casts and borders show without an image viewer.

Shared by the evaluation's grids (truth | stock + resize | InfGen) and training's MLflow validation grid
(truth | InfGen). Text is drawn with Pillow's bundled default font: nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 2  # pixels between columns and rows, so where one image ends is visible
GAP_COLOUR = 64
ZOOM = 4  # the central patch, 1/ZOOM of each side, shown ZOOM× larger with nearest-neighbour pixels
LARGEST_FONT, SMALLEST_FONT = 14, 6


def central_zoom(image: np.ndarray, zoom: int = ZOOM) -> np.ndarray:
    """The central (H/zoom)×(W/zoom) patch of an H×W×3 image, repeated zoom× per pixel (about H×W again)."""
    height, width = image.shape[:2]
    patch_height, patch_width = max(1, height // zoom), max(1, width // zoom)
    top, left = (height - patch_height) // 2, (width - patch_width) // 2
    patch = image[top : top + patch_height, left : left + patch_width]
    return patch.repeat(zoom, axis=0).repeat(zoom, axis=1)


def _font(text: str, width: int, largest: int = LARGEST_FONT):
    """The largest default-font size (`largest` down to SMALLEST_FONT) at which `text` fits `width`."""
    for size in range(largest, SMALLEST_FONT - 1, -1):
        font = ImageFont.load_default(size)
        if font.getlength(text) <= width - 4:
            return font
    return ImageFont.load_default(SMALLEST_FONT)


def label_strip(widths: list[int], labels: list[str]) -> np.ndarray:
    """A white strip with each label centred over its column (columns `widths` wide, GAP apart)."""
    height = LARGEST_FONT + 6
    strip = Image.new("RGB", (sum(widths) + GAP * (len(widths) - 1), height), "white")
    draw = ImageDraw.Draw(strip)
    left = 0
    for width, label in zip(widths, labels, strict=True):
        font = _font(label, width)
        text_width = font.getlength(label)
        draw.text((left + max(0.0, (width - text_width) / 2), 3), label, fill="black", font=font)
        left += width + GAP
    return np.asarray(strip)


def _side_by_side(images: list[np.ndarray]) -> np.ndarray:
    height = max(image.shape[0] for image in images)
    pieces = []
    for index, image in enumerate(images):
        if index:
            pieces.append(np.full((height, GAP, 3), GAP_COLOUR, np.uint8))
        padded = np.full((height, image.shape[1], 3), GAP_COLOUR, np.uint8)
        padded[: image.shape[0]] = image
        pieces.append(padded)
    return np.concatenate(pieces, axis=1)


def _caption(line: np.ndarray, text: str, width: int) -> np.ndarray:
    """`text` in white on a black box in the top-left corner of `line`: says what a zoom row is."""
    image = Image.fromarray(line)
    draw = ImageDraw.Draw(image)
    font = _font(text, width // 2, largest=10)  # small: it sits on the zoomed pixels
    right, bottom = font.getlength(text) + 4, font.size + 4
    draw.rectangle((0, 0, right, bottom), fill="black")
    draw.text((2, 1), text, fill="white", font=font)
    return np.asarray(image)


def comparison_grid(rows: list[list[np.ndarray]], labels: list[str], zoom: int = ZOOM) -> np.ndarray:
    """H×W×3 uint8: `labels` over the columns, then per row its images side by side and, when `zoom`, their
    central patches zoomed beneath them. Every row has one image per label."""
    if not rows:
        raise ValueError("a comparison grid needs at least one row")
    widths = [max(row[column].shape[1] for row in rows) for column in range(len(labels))]
    lines = [label_strip(widths, labels)]
    for row in rows:
        if len(row) != len(labels):
            raise ValueError(f"a grid row has {len(row)} images for {len(labels)} labels {labels}")
        lines.append(_side_by_side(row))
        if zoom:
            zoomed = _side_by_side([central_zoom(image, zoom) for image in row])
            lines.append(_caption(zoomed, f"centre x{zoom}", widths[0]))
    total = max(line.shape[1] for line in lines)
    padded = []
    for index, line in enumerate(lines):
        if index:
            padded.append(np.full((GAP, total, 3), GAP_COLOUR, np.uint8))
        wide = np.full((line.shape[0], total, 3), 255 if index == 0 else GAP_COLOUR, np.uint8)
        wide[:, : line.shape[1]] = line
        padded.append(wide)
    return np.concatenate(padded, axis=0)
