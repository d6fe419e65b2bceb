"""The latent stage's record, LATENTS/latents.json: the one source of a latent dataset's geometry.

The latent stage writes it when it claims its output folder (`config`, `inputs`) and completes it when the
stage finishes (`geometry`). Everything downstream reads the geometry here and nowhere else: training takes
the decoder's latent channels, its in-distribution scale and its default validation sizes from it; evaluation
takes the VAE, its channels and the encoder's input side from it; both take the held-out rule from it.

    geometry:
      vae                 the VAE source the stage was configured with (a path or hub id; null = the
                          embedded offline substitute), so later stages load the same one
      vae_label           what the shards say encoded them
      latent_channels     C of the (C, h, w) latents
      scaling_factor      latents are stored × this (and − shift first): the diffusion convention
      shift_factor
      vae_downsample      input pixels per latent cell along a side (8 for KL-f8)
      input_side          the encoder's input side (crops are squashed to input_side²)
      target_sizes        every (height, width) a training target can have
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipelines.common.files import read_json
from pipelines.common.shard_integrity import check_shards

RECORD_NAME = "latents.json"


def record_path(latents: str) -> str:
    return f"{latents.rstrip('/')}/{RECORD_NAME}"


@dataclass(frozen=True)
class LatentRecord:
    path: str  # the latent stage's output folder
    vae: str | None
    vae_label: str
    latent_channels: int
    scaling_factor: float
    shift_factor: float
    vae_downsample: int
    input_side: int
    target_sizes: tuple[tuple[int, int], ...]
    holdout_fraction: float
    seed: int

    @property
    def latent_side(self) -> int:
        return self.input_side // self.vae_downsample

    @property
    def max_target_side(self) -> int:
        return max(max(size) for size in self.target_sizes)

    @property
    def in_distribution_scale(self) -> float:
        """How far beyond the input side training targets reach: the decoder's single-pass range."""
        return self.max_target_side / self.input_side

    def limited_to(self, max_side: int | None) -> LatentRecord:
        """The record as a training run that uses only targets with sides ≤ max_side sees it."""
        if max_side is None:
            return self
        sizes = tuple(size for size in self.target_sizes if max(size) <= max_side)
        if not sizes:
            raise ValueError(
                f"max_target_side {max_side}: the latents in {self.path} have no target that small "
                f"(smallest {min(self.target_sizes, key=max)})"
            )
        return dataclasses.replace(self, target_sizes=sizes)

    def validation_sizes(self) -> tuple[tuple[int, int], ...]:
        """1× (the stock decoder's own size), the largest square target, and the widest target at the
        largest side: the three views of a decoder worth looking at during training."""
        largest = self.max_target_side
        square = [(h, w) for h, w in self.target_sizes if h == w == largest] or [(largest, largest)]
        widest = max(
            (size for size in self.target_sizes if size[1] == largest), key=lambda s: (s[1] / s[0], s[0])
        )
        sizes = [(self.input_side, self.input_side), square[0], widest]
        return tuple(dict.fromkeys(sizes))  # in order, without repeats


def geometry(vae: str | None, vae_label: str, latent_shape, scaling_factor: float, shift_factor: float,
             input_side: int, target_sizes) -> dict:  # fmt: skip
    """The `geometry` entry the latent stage writes once its shards exist."""
    channels, side, _ = (int(value) for value in latent_shape)
    if input_side % side:
        raise ValueError(f"latents of side {side} do not divide the encoder input side {input_side}")
    return {
        "vae": vae,
        "vae_label": vae_label,
        "latent_channels": channels,
        "scaling_factor": float(scaling_factor),
        "shift_factor": float(shift_factor),
        "vae_downsample": input_side // side,
        "input_side": int(input_side),
        "target_sizes": sorted([int(h), int(w)] for h, w in target_sizes),
    }


def read_latent_record(latents: str) -> LatentRecord:
    """The geometry of the latents in folder `latents`; a clear error when the stage never finished there,
    or when one of its shards is missing or has another size than the stage recorded (one listing, on the
    driver of every stage that reads latents, before any worker starts)."""
    path = record_path(latents)
    record = read_json(path, "latent stage record")
    found = record.get("geometry")
    if not found:
        raise ValueError(
            f"latent stage record {path} has no geometry: the latent stage has not finished there (or wrote "
            "it with an older version); rerun `infgen latents` with the same options to complete it"
        )
    check_shards(latents)
    config = record["config"]
    return LatentRecord(
        path=latents.rstrip("/"),
        vae=found["vae"],
        vae_label=found["vae_label"],
        latent_channels=int(found["latent_channels"]),
        scaling_factor=float(found["scaling_factor"]),
        shift_factor=float(found["shift_factor"]),
        vae_downsample=int(found["vae_downsample"]),
        input_side=int(found["input_side"]),
        target_sizes=tuple((int(h), int(w)) for h, w in found["target_sizes"]),
        holdout_fraction=float(config.get("holdout_fraction", 0.0)),
        seed=int(config["seed"]),
    )
