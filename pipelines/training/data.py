"""Training batches from latent shards and the image shards they were cut from.

Every global batch has one target size (bucketed), and batch number g is a pure function of (seed, g): the
"data position" in a checkpoint is just g, so a resumed run sees exactly the batches the uninterrupted run
would have. Rank r takes its slice of each global batch. The ground truth is rebuilt from the source image
and the stored crop box (pipelines/common/latent_shards.py).

Both kinds of shard are checked against their stages' records (pipelines/common/shard_integrity.py): sizes
when the batches are planned (the driver has checked them already, before Ray Train started), and each
shard's sha256 when it is read whole into the cache.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.common.crops import CropSample, crop_pair, decode_rgb
from pipelines.common.latent_shards import read_latents
from pipelines.common.shard_integrity import check_shards, read_verified

PLAN_COLUMNS = ["key", "target_height", "target_width"]


@dataclass(frozen=True)
class SampleRef:
    shard: str
    row: int
    target: tuple[int, int]


class LatentBatches:
    def __init__(
        self,
        latents_dir: str,
        images_dir: str,
        global_batch: int,
        seed: int,
        cache_shards: int = 4,
        max_target_side: int | None = None,
    ):
        self.latent_records = check_shards(latents_dir, "training latents")
        self.image_records = check_shards(images_dir, "training images")
        filesystem, root = fsspec.core.url_to_fs(latents_dir)
        self.filesystem, self.latents_root = filesystem, root
        self.images_root = fsspec.core.url_to_fs(images_dir)[1]
        self.global_batch, self.seed = global_batch, seed
        self.cache: OrderedDict[str, tuple] = OrderedDict()
        self.cache_shards = max(2, cache_shards)
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
        (fewer than a batch) carry over into the next window. So a worker reads each image shard about once an
        epoch (a window and the one before it fit the shard cache) instead of one shard per sample, and every
        bucket still yields floor(samples / global_batch) batches an epoch, the same number in every epoch.
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

    def _shard(self, name: str):
        if name not in self.cache:
            # Read whole (as parsing would), checked, then parsed: the bytes checked are the bytes used.
            latents = read_verified(f"{self.latents_root}/{name}", self.latent_records, self.filesystem)
            table = pq.read_table(pa.BufferReader(latents))
            images = read_verified(f"{self.images_root}/{name}", self.image_records, self.filesystem)
            images = pq.read_table(pa.BufferReader(images), columns=["key", "image"])
            lookup = dict(zip(images.column("key").to_pylist(), range(images.num_rows)))
            self.cache[name] = (table, read_latents(table), images, lookup)
            while len(self.cache) > self.cache_shards:
                self.cache.popitem(last=False)
        self.cache.move_to_end(name)
        return self.cache[name]

    def batch(self, index: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (b, C, h, w), truth (b, 3, H, W) in [-1, 1]) for this rank's slice of batch `index`."""
        refs = self.global_batch_refs(index)
        size = len(refs) // world_size
        latents, truths = [], []
        for ref in refs[rank * size : (rank + 1) * size]:
            table, latent_array, images, lookup = self._shard(ref.shard)
            row = table.slice(ref.row, 1).to_pylist()[0]
            sample = CropSample(row["crop_top"], row["crop_left"], row["crop_height"], row["crop_width"],
                                row["target_height"], row["target_width"], row["seed"])  # fmt: skip
            image = decode_rgb(images.column("image")[lookup[row["key"]]].as_py())
            _, truth = crop_pair(image, sample, input_side=8)  # the encoder input is not needed here
            latents.append(torch.from_numpy(latent_array[ref.row].copy()))
            truths.append(torch.from_numpy(truth.copy()).permute(2, 0, 1).float() / 127.5 - 1.0)
        latent_batch = torch.stack(latents)
        if not torch.isfinite(latent_batch).all():
            raise ValueError(
                f"non-finite latents in global batch {index} (shards {sorted({r.shard for r in refs})})"
            )
        return latent_batch, torch.stack(truths)
