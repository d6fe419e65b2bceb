"""The evaluation's work units: one chunk per (source, size, a few images), each scored into one part file,
the unit of resume. Plain typed records, handed to the scoring actors as they are."""

from __future__ import annotations

from dataclasses import dataclass

RECONSTRUCTION = "reconstruction"


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class Chunk:
    source: str  # "reconstruction" or the name of a latent source
    size: tuple[int, int]  # (height, width) decoded and scored
    start: int  # index of the chunk's first image or latent within its source
    count: int
    part: str  # the part file it is scored into
    grid: str  # the comparison grid its source and size get (drawn by the chunk that starts at 0)
    file: str | None = None  # latent sources: the latent file
    refs: tuple[dict, ...] | None = None  # reconstruction: the held-out images ({"shard", "row", "key"})

    @property
    def keys(self) -> tuple[str, ...] | None:
        return tuple(ref["key"] for ref in self.refs) if self.refs is not None else None


def plan_chunks(out: str, sizes, chunk_images: int, refs: list[dict],
                latent_sources: dict[str, tuple[str, int]]) -> list[Chunk]:  # fmt: skip
    """Every chunk of every source at every size; `latent_sources`: {name: (file, number of latents)}."""
    chunks = []
    for size in (tuple(size) for size in sizes):
        units = [(RECONSTRUCTION, None, len(refs))]
        units += [(name, path, count) for name, (path, count) in latent_sources.items()]
        for source, path, total in units:
            for start in range(0, total, chunk_images):
                count = min(chunk_images, total - start)
                chunks.append(Chunk(
                    source=source, size=size, start=start, count=count,
                    part=f"{out}/parts/{source}/{size_name(size)}/{start // chunk_images:05d}.npz",
                    grid=f"{out}/grids/{source}_{size_name(size)}.png", file=path,
                    refs=tuple(refs[start : start + count]) if source == RECONSTRUCTION else None,
                ))  # fmt: skip
    return chunks
