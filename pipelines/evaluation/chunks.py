"""The evaluation's work units: one chunk per (source, size, a few images), each scored into one part file,
the unit of resume. Plain typed records, handed to the scoring actors as they are."""

from __future__ import annotations

from dataclasses import dataclass

HELD_OUT = "held-out"  # the images the latent stage kept out of training (or a separate ingest)
IMAGE_FOLDER = "photos"  # --images-dir: a folder of image files, e.g. real photographs
IMAGE_SOURCES = (HELD_OUT, IMAGE_FOLDER)  # sources with ground truth, in the table's order


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class Chunk:
    source: str  # HELD_OUT, IMAGE_FOLDER or the name of a latent source
    size: tuple[int, int]  # (height, width) decoded and scored
    start: int  # index of the chunk's first image or latent within its source (at this size)
    count: int
    part: str  # the part file it is scored into
    grid: str  # the comparison grid its source and size get (drawn by the chunk that starts at 0)
    file: str | None = None  # latent sources: the latent file
    # image sources: the images ({"shard", "row", "key"} held out; {"path", "key", ...} from a folder)
    refs: tuple[dict, ...] | None = None
    # Scored on PSNR/SSIM/LPIPS only: a handful of photographs gives no distribution to compare.
    full_reference_only: bool = False

    @property
    def keys(self) -> tuple[str, ...] | None:
        return tuple(ref["key"] for ref in self.refs) if self.refs is not None else None


@dataclass(frozen=True)
class Unit:
    """One source at one size, before it is cut into chunks."""

    source: str
    total: int
    file: str | None = None
    refs: list[dict] | None = None
    full_reference_only: bool = False


def plan_chunks(out: str, sizes, chunk_images: int, units_at) -> list[Chunk]:
    """Every chunk of every source at every size; `units_at(size)` lists the sources' units at that size
    (an image folder may hold fewer images at a larger size)."""
    chunks = []
    for size in (tuple(size) for size in sizes):
        for unit in units_at(size):
            for start in range(0, unit.total, chunk_images):
                count = min(chunk_images, unit.total - start)
                chunks.append(Chunk(
                    source=unit.source, size=size, start=start, count=count,
                    part=f"{out}/parts/{unit.source}/{size_name(size)}/{start // chunk_images:05d}.npz",
                    grid=f"{out}/grids/{unit.source}_{size_name(size)}.png", file=unit.file,
                    refs=tuple(unit.refs[start : start + count]) if unit.refs is not None else None,
                    full_reference_only=unit.full_reference_only,
                ))  # fmt: skip
    return chunks
