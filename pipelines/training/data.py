"""Training batches from latent shards and the image shards they were cut from.

Every global batch has one target size (bucketed), and batch number g is a pure function of (seed, g): the
"data position" in a checkpoint is just g, so a resumed run sees exactly the batches the uninterrupted run
would have. Rank r takes its slice of each global batch. The ground truth is rebuilt from the source image
and the stored crop box (pipelines/common/latent_shards.py).

Off the training step: the next `prefetch` batches are assembled on a background thread while the step runs,
their ground truths decoded and resized `decode_threads` at a time (Pillow works without the GIL), a JPEG
at the smallest DCT scale that still holds its crop at the target size (`ground_truth`). Shards are read
once an epoch per rank: reading one keeps just the rows this rank takes from it for the rest of the epoch
(about their images' bytes) and lets the shard go, so a bucket whose samples are spread over many shards
(stage 2's rare target sizes) costs memory for those rows, not another read of a 1–3 GB shard.

Both kinds of shard are checked against their stages' records (pipelines/common/shard_integrity.py): sizes
when the batches are planned (the driver has checked them already, before Ray Train started), and each
shard's sha256 when it is read whole. An image that fails to decode under the large-image policy
(pipelines/common/image_policy.py) is skipped with its key (`skipped`): its sample is replaced in the batch.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipelines.common.crops import CropSample, crop_pair
from pipelines.common.image_policy import UndecodableImage, load_checked, open_checked
from pipelines.common.latent_shards import read_latents
from pipelines.common.shard_integrity import check_shards, read_verified

PLAN_COLUMNS = ["key", "target_height", "target_width"]
CROP_COLUMNS = ["crop_top", "crop_left", "crop_height", "crop_width", "target_height", "target_width", "seed"]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRef:
    shard: str
    row: int
    target: tuple[int, int]


@dataclass(frozen=True)
class _Row:
    """What one sample needs once its shard is gone: ~the source image's bytes."""

    latent: np.ndarray
    crop: CropSample
    key: str
    image: bytes


class LatentBatches:
    def __init__(
        self,
        latents_dir: str,
        images_dir: str,
        global_batch: int,
        seed: int,
        cache_shards: int = 4,
        max_target_side: int | None = None,
        prefetch: int = 2,
        decode_threads: int = 2,
        reduced_decode: bool = True,
    ):
        self.latent_records = check_shards(latents_dir, "training latents")
        self.image_records = check_shards(images_dir, "training images")
        filesystem, root = fsspec.core.url_to_fs(latents_dir)
        self.filesystem, self.latents_root = filesystem, root
        self.images_root = fsspec.core.url_to_fs(images_dir)[1]
        self.global_batch, self.seed = global_batch, seed
        self.cache_shards = max(2, cache_shards)  # the planning window: 2 shards' worth of rows in memory
        self.shard_reads: Counter[str] = Counter()  # shard → times read whole
        self._rows: dict[SampleRef, _Row] = {}  # rows read ahead of the batch that takes them
        self._rows_for: tuple[int, int, int] | None = None  # (epoch, rank, world size) of the kept rows
        self._plan: dict[str, list[tuple[int, SampleRef]]] = {}
        self._plan_key: tuple[int, int, int] | None = None
        self.prefetch, self.decode_threads = max(0, prefetch), max(1, decode_threads)
        self.reduced_decode = reduced_decode  # False: every image decoded in full (bench/train.py compares)
        self._lock = threading.Lock()
        self._decoders: ThreadPoolExecutor | None = None
        self._assembler: ThreadPoolExecutor | None = None
        self._ahead: dict[tuple[int, int, int], Future] = {}
        self.skipped: dict[str, str] = {}  # image key → reason, for images that failed to decode here
        self.by_shard: dict[str, list[SampleRef]] = {}
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for path in sorted(filesystem.glob(f"{root}/*.parquet")):
            name = path.rsplit("/", 1)[-1]
            with filesystem.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=PLAN_COLUMNS)
            targets = zip(*(table.column(c).to_pylist() for c in PLAN_COLUMNS[1:]))
            self.by_shard[name] = [
                SampleRef(name, row, (h, w))
                for row, (h, w) in enumerate(targets)
                if max_target_side is None or max(h, w) <= max_target_side
            ]
            for ref in self.by_shard[name]:
                counts[ref.target] += 1
        if not any(count >= global_batch for count in counts.values()):
            limit = f" with sides ≤ {max_target_side}" if max_target_side else ""
            raise ValueError(
                f"no target size{limit} in {latents_dir} has {global_batch} samples (the global batch): "
                f"sizes {sorted(counts.items())}"
            )
        # Each bucket gives floor(samples / global_batch) batches an epoch, whatever the shard order.
        self.per_epoch = sum(count // global_batch for count in counts.values())
        self._epoch_cache: dict[int, list[list[SampleRef]]] = {}

    def epoch(self, number: int) -> list[list[SampleRef]]:
        """All global batches of one epoch, in order.

        Shards are visited in a seeded order, a window of `cache_shards // 2` at a time; each window's samples
        are bucketed by target size, cut into global batches and shuffled, and a bucket's leftover samples
        (fewer than a batch) carry over into the next window. So the rows a rank keeps from the shards it has
        read are mostly a window's, plus the carried ones, and every bucket still yields
        floor(samples / global_batch) batches an epoch, the same number in every epoch.
        """
        if number not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, number])
            names = sorted(self.by_shard)
            order = [names[i] for i in rng.permutation(len(names))]
            window = self.cache_shards // 2
            leftovers: dict[tuple[int, int], list[SampleRef]] = defaultdict(list)
            batches: list[list[SampleRef]] = []
            for start in range(0, len(order), window):
                arrived = defaultdict(list)
                for name in order[start : start + window]:
                    for ref in self.by_shard[name]:
                        arrived[ref.target].append(ref)
                cut, carried = [], leftovers
                leftovers = defaultdict(list)
                for target in sorted(set(arrived) | set(carried)):
                    shuffled = [arrived[target][i] for i in rng.permutation(len(arrived[target]))]
                    refs = carried[target] + shuffled  # the carried samples go first: their shards leave soon
                    whole = len(refs) - len(refs) % self.global_batch
                    cut += [refs[i : i + self.global_batch] for i in range(0, whole, self.global_batch)]
                    leftovers[target] = refs[whole:]
                batches += [cut[i] for i in rng.permutation(len(cut))]
            assert len(batches) == self.per_epoch, (len(batches), self.per_epoch)
            self._epoch_cache = {number: batches}
        return self._epoch_cache[number]

    def global_batch_refs(self, index: int) -> list[SampleRef]:
        return self.epoch(index // self.per_epoch)[index % self.per_epoch]

    def _load_shard(self, name: str) -> tuple:
        # Read whole (as parsing would), checked, then parsed: the bytes checked are the bytes used.
        self.shard_reads[name] += 1
        latents = read_verified(f"{self.latents_root}/{name}", self.latent_records, self.filesystem)
        table = pq.read_table(pa.BufferReader(latents))
        images = read_verified(f"{self.images_root}/{name}", self.image_records, self.filesystem)
        images = pq.read_table(pa.BufferReader(images), columns=["key", "image"])
        lookup = dict(zip(images.column("key").to_pylist(), range(images.num_rows)))
        return table, read_latents(table), images, lookup

    def _rank_plan(self, number: int, rank: int, world_size: int) -> dict[str, list[tuple[int, SampleRef]]]:
        """Epoch `number`'s samples this rank takes, by shard: [(global batch index, ref)]."""
        if self._plan_key != (number, rank, world_size):
            plan: dict[str, list[tuple[int, SampleRef]]] = defaultdict(list)
            for offset, refs in enumerate(self.epoch(number)):
                size = len(refs) // world_size
                for ref in refs[rank * size : (rank + 1) * size]:
                    plan[ref.shard].append((number * self.per_epoch + offset, ref))
            self._plan, self._plan_key = plan, (number, rank, world_size)
        return self._plan

    def _take_rows(self, name: str, index: int, rank: int, world_size: int) -> None:
        """Read shard `name` and keep every row of it this rank takes from batch `index` to the epoch's end:
        the shard itself is not kept, so it is read once an epoch (per rank), whatever the bucket order."""
        number = index // self.per_epoch
        wanted = [ref for at, ref in self._rank_plan(number, rank, world_size)[name] if at >= index]
        table, latent_array, images, lookup = self._load_shard(name)
        columns = {c: table.column(c).to_pylist() for c in ("key", *CROP_COLUMNS)}
        image_column, image_bytes = images.column("image"), {}
        for ref in wanted:
            crop = CropSample(*(columns[c][ref.row] for c in CROP_COLUMNS))
            key = columns["key"][ref.row]
            if key not in image_bytes:  # an image's samples share one copy of its bytes
                image_bytes[key] = image_column[lookup[key]].as_py()
            self._rows[ref] = _Row(latent_array[ref.row].copy(), crop, key, image_bytes[key])

    def _resolve(self, index: int, rank: int, world_size: int) -> list[_Row]:
        """This rank's rows of batch `index`, taken out of the kept rows (reading their shards if needed)."""
        number = index // self.per_epoch
        if self._rows_for != (number, rank, world_size):
            self._rows.clear()  # kept for another epoch or rank (a resume, a validation batch): not needed
            self._rows_for = (number, rank, world_size)
        refs = self.global_batch_refs(index)
        size = len(refs) // world_size
        rows = []
        for ref in refs[rank * size : (rank + 1) * size]:
            if ref not in self._rows:
                self._take_rows(ref.shard, index, rank, world_size)
            rows.append(self._rows.pop(ref))
        return rows

    def _sample(self, row: _Row) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent, truth (3, H, W) in [-1, 1]); UndecodableImage (with .key) if the image fails."""
        try:
            truth = ground_truth(row.image, row.crop, self.reduced_decode)
        except UndecodableImage as error:
            error.key = row.key
            raise
        return torch.from_numpy(row.latent), torch.from_numpy(truth.copy()).permute(
            2, 0, 1
        ).float() / 127.5 - 1

    def _pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        # Made on first use, in the process that uses them (the object may be built elsewhere).
        if self._decoders is None:
            self._decoders = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="truth-decode")
            self._assembler = ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch")
        return self._decoders, self._assembler

    def _assemble(self, index: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Runs on the one assembler thread: the kept rows and the plan are only ever touched here.
        rows = self._resolve(index, rank, world_size)
        decoders, _ = self._pools()
        futures = [decoders.submit(self._sample, row) for row in rows]
        results, failed = [], []
        for future in futures:
            try:
                results.append(future.result())
            except UndecodableImage as error:
                results.append(None)
                failed.append(error)
        if failed:
            # The image passed ingest and the latent stage, so this decoder differs from theirs: the sample is
            # replaced by the next good one of the same slice (same target size, and the same on every run).
            good = [result for result in results if result is not None]
            if not good:
                keys = ", ".join(f"{error.key} ({error.reason})" for error in failed)
                raise ValueError(f"global batch {index}, rank {rank}: no image of the slice decodes: {keys}")
            for error in failed:
                if error.key not in self.skipped:
                    logger.warning("training: image %s does not decode (%s): its samples are replaced",
                                   error.key, error)  # fmt: skip
                self.skipped[error.key] = error.reason
            results = [result or good[i % len(good)] for i, result in enumerate(results)]
        latent_batch = torch.stack([result[0] for result in results])
        if not torch.isfinite(latent_batch).all():
            shards = sorted({ref.shard for ref in self.global_batch_refs(index)})
            raise ValueError(f"non-finite latents in global batch {index} (shards {shards})")
        return latent_batch, torch.stack([result[1] for result in results])

    def batch(self, index: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (b, C, h, w), truth (b, 3, H, W) in [-1, 1]) for this rank's slice of batch `index`.

        The next `prefetch` batches of the same rank are assembled in the background while the caller trains
        on this one (their samples decoded `decode_threads` at a time); a batch is the same whether it was
        prefetched or not, so a resumed run, which asks for another step first, sees the same batches.
        """
        _, assembler = self._pools()
        with self._lock:
            for stale in [k for k in self._ahead if k[1:] != (rank, world_size) or k[0] < index]:
                self._ahead.pop(stale).cancel()
            wanted = range(index, index + 1 + self.prefetch)
            for ahead in wanted:
                if (ahead, rank, world_size) not in self._ahead:
                    self._ahead[(ahead, rank, world_size)] = assembler.submit(self._assemble, ahead, rank,
                                                                               world_size)  # fmt: skip
            current = self._ahead.pop((index, rank, world_size))
        return current.result()

    def close(self) -> None:
        """Stop the background threads (pending prefetches are dropped)."""
        for pool in (self._assembler, self._decoders):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._decoders = self._assembler = None
        self._ahead.clear()


def ground_truth(data: bytes, sample: CropSample, reduced: bool = True) -> np.ndarray:
    """The sample's ground truth (target_h × target_w × 3 uint8) from the original image's bytes.

    A JPEG is decoded at the smallest of 1/8, 1/4, 1/2 or full scale that still holds the crop at its target
    size or more (libjpeg scales in the DCT, so a 12 MP image needed at a quarter of its size costs about a
    sixteenth of its full decode); the reduced image's crop is then resized to the target as the full one
    would be (BICUBIC, antialiased), from the exact (fractional) crop box.
    """
    image = open_checked(data)
    width, height = image.size
    shrink = min(sample.height / sample.target_height, sample.width / sample.target_width)
    if reduced and shrink >= 2 and image.format == "JPEG":
        image.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
    load_checked(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size == (width, height):
        return crop_pair(image, sample, input_side=8)[1]  # the encoder input is not needed here
    x, y = image.width / width, image.height / height
    box = (sample.left * x, sample.top * y, (sample.left + sample.width) * x,
           (sample.top + sample.height) * y)  # fmt: skip
    return np.asarray(image.resize((sample.target_width, sample.target_height), Image.BICUBIC, box=box))
