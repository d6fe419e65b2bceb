"""The large-image policy every stage follows: one pixel limit, one way to decode, one meaning of "skipped".

The limit: an image may have up to `MAX_PIXELS` (200 MP) pixels. Ingest refuses larger ones (and may refuse
more with a lower `verify.max_pixels`, never fewer: its config cannot go above this), so every later stage
can decode whatever ingest kept. Pillow's own decompression-bomb guard is a process-wide setting that
defaults to ~89 MP (it raises above twice that, ~179 MP, with an error that is not an OSError); importing
this module sets it to `MAX_PIXELS` once, and nothing else in the project changes it, so threads never
disagree about it. The declared size is checked against the limit from the header, before pixels are
decoded.

One decode: `decode_rgb(data)` returns a loaded RGB Pillow image or raises `UndecodableImage`, a ValueError
whose `reason` is one of `REASONS`. It is the only exception a caller needs to catch.

"Skipped and counted with its key", per stage:
- ingest: the image goes to `rejects/` with its key and the reason (pipelines/ingest/verification.py);
- latents: the image gives no samples; the shard's stats count it under the reason (`skipped`) and list its
  key (`skipped_keys`, reason → keys), which the stage's manifest sums and collects;
- training: a sample whose image fails is replaced in its batch by another sample of the same batch (so the
  batch keeps its size and stays a pure function of the step) and its key is kept in `LatentBatches.skipped`
  with the reason, logged once (pipelines/training/data.py);
- evaluation: its image sources use `decode_rgb` and count what they skip the same way.
"""

from __future__ import annotations

import io

from PIL import Image

MAX_PIXELS = 200_000_000

REASONS = ("empty", "not_an_image", "decompression_bomb", "truncated", "decode_error")

Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class UndecodableImage(ValueError):
    """An image refused or failed under the policy; `reason` is one of REASONS, `size` (w, h) if known."""

    def __init__(self, reason: str, detail: str = "", size: tuple[int, int] = (0, 0)):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.size = reason, size


def check_limit(max_pixels: int, name: str = "max_pixels") -> int:
    """`max_pixels` if it is within the policy, else a ValueError naming `name` (a config field)."""
    if not 0 < max_pixels <= MAX_PIXELS:
        raise ValueError(
            f"{name} is {max_pixels}: it must be in 1..{MAX_PIXELS} (pipelines/common/image_policy.py), "
            "the largest image the later stages decode"
        )
    return max_pixels


def open_checked(data: bytes | None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image opened lazily (header parsed, nothing decoded), within `max_pixels`; close it after use."""
    if not data:
        raise UndecodableImage("empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # above twice MAX_PIXELS: Pillow refuses to open it
        raise UndecodableImage("decompression_bomb", str(error)) from None
    except Image.UnidentifiedImageError:
        raise UndecodableImage("not_an_image") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UndecodableImage(_damage(error), str(error)) from None
    if image.width * image.height > min(max_pixels, MAX_PIXELS):
        size = image.size
        image.close()
        raise UndecodableImage("decompression_bomb", f"{size[0]}x{size[1]}", size)
    return image


def _damage(error: Exception) -> str:
    return "truncated" if "truncated" in str(error).lower() else "decode_error"  # Pillow says it in words


def load_checked(image: Image.Image) -> None:
    """Decode all of an `open_checked` image's pixels, raising UndecodableImage if they are damaged."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # Pillow reports truncation as OSError
        raise UndecodableImage(_damage(error), str(error), image.size) from None


def decode_rgb(data: bytes | None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The whole image decoded as RGB, or UndecodableImage. An RGB image is returned as decoded (no copy:
    a 200 MP image is 600 MB)."""
    image = open_checked(data, max_pixels)  # over bytes in memory: nothing to close but the image itself
    load_checked(image)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise UndecodableImage("decode_error", str(error), image.size) from None
