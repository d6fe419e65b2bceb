"""Training batches from latent shards and the image shards they were cut from.

Every global batch has one target size (bucketed), and batch number g is a pure function of (seed, g): the
"data position" in a checkpoint is just g, so a resumed run sees exactly the batches the uninterrupted run
would have. Rank r takes its slice of each global batch. The ground truth is rebuilt from the source image
and the stored crop box (see pipelines/latents/encode.py).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.latents.crops import CropSample, crop_pair, decode_rgb
from pipelines.latents.encode import read_latents

PLAN_COLUMNS = ["key", "target_height", "target_width"]


@dataclass(frozen=True)
class SampleRef:
    shard: str
    row: int
    target: tuple[int, int]


class LatentBatches:
    def __init__(
        self, latents_dir: str, images_dir: str, global_batch: int, seed: int, cache_shards: int = 8
    ):
        filesystem, root = fsspec.core.url_to_fs(latents_dir)
        self.filesystem, self.latents_root = filesystem, root
        self.images_root = fsspec.core.url_to_fs(images_dir)[1]
        self.global_batch, self.seed = global_batch, seed
        self.cache: OrderedDict[str, tuple] = OrderedDict()
        self.cache_shards = cache_shards
        by_target: dict[tuple[int, int], list[SampleRef]] = defaultdict(list)
        for path in sorted(filesystem.glob(f"{root}/*.parquet")):
            name = path.rsplit("/", 1)[-1]
            with filesystem.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=PLAN_COLUMNS)
            for row, (height, width) in enumerate(
                zip(*(table.column(c).to_pylist() for c in PLAN_COLUMNS[1:]))
            ):
                by_target[(height, width)].append(SampleRef(name, row, (height, width)))
        self.by_target = dict(sorted(by_target.items()))
        if not any(len(refs) >= global_batch for refs in self.by_target.values()):
            raise ValueError(
                f"no target size in {latents_dir} has {global_batch} samples (the global batch): "
                f"sizes {[(size, len(refs)) for size, refs in self.by_target.items()]}"
            )
        self._epoch_cache: dict[int, list[list[SampleRef]]] = {}

    def epoch(self, number: int) -> list[list[SampleRef]]:
        """All global batches of one epoch, in order (incomplete ones dropped)."""
        if number not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, number])
            batches = []
            for refs in self.by_target.values():
                order = rng.permutation(len(refs))
                for start in range(0, len(refs) - self.global_batch + 1, self.global_batch):
                    batches.append([refs[i] for i in order[start : start + self.global_batch]])
            self._epoch_cache = {number: [batches[i] for i in rng.permutation(len(batches))]}
        return self._epoch_cache[number]

    def global_batch_refs(self, index: int) -> list[SampleRef]:
        per_epoch = len(self.epoch(0))
        return self.epoch(index // per_epoch)[index % per_epoch]

    def _shard(self, name: str):
        if name not in self.cache:
            with self.filesystem.open(f"{self.latents_root}/{name}", "rb") as handle:
                table = pq.read_table(handle)
            with self.filesystem.open(f"{self.images_root}/{name}", "rb") as handle:
                images = pq.read_table(handle, columns=["key", "image"])
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
