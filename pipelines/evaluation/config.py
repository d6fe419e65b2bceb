"""The evaluation stage's typed configuration: the protocol (docs/paper.md, "Evaluation protocol").

What the latents fix is not restated here: the VAE, its latent channels and the encoder's input side come
from the latent stage's record (pipelines/common/latent_record.py), or, for an ingest kept apart for
evaluation, from the command's --vae and --input-side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class EvalConfig:
    sizes: tuple[tuple[int, int], ...] = ((512, 512), (1024, 1024), (2048, 2048), (3072, 3072))
    # Square sizes as multiples of the encoder's input side (the latent record's), used when `sizes` is
    # empty: a preset that follows whatever crops the latent stage made (1×, 2×, 4×).
    scales: tuple[int, ...] = ()
    max_images: int = 10_000  # per latent source (the paper protocol: 10K samples per resolution)
    patch_size: int = 256  # FIDp / sFIDp: patches at native resolution, never resized before Inception
    patches_per_image: int = 10
    patch_mode: str = "random"  # "random" (seeded per image) or "grid"
    baseline_resample: str = "lanczos"  # the stock decoder's output upsampled with Pillow: lanczos | bicubic
    precision_recall_k: int = 3
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    chunk_images: int = 16  # images per work unit (one part file; the unit of resume)
    decode_batch: int = 4
    # Samples per diffusers pipeline call (--diffusers-pipeline sources): bounds GPU memory at 10K samples.
    # The samples depend on it (one generator runs through the batches), but they are sampled once into
    # OUTPUT/sources/NAME.npy and a resume reads that file, so it is a resource field like `workers`.
    sample_batch: int = 64
    workers: int = 2  # evaluation actors (one GPU each when the cluster has GPUs)
    grid_images: int = 3  # side-by-side rows (truth | baseline | InfGen) per source and size
    seed: int = 0
    inception: str | None = (
        None  # clean-fid's inception-2015-12-05.pt; None → its default place, else substitute
    )
    lpips_trunk: str | None = None  # torchvision AlexNet weights for LPIPS; None → default place, else random
    mlflow_experiment: str = "infgen-eval"
    # How the stage runs, not what it scores: a resume may change it (pipelines/common/stage_output.py).
    RESOURCE_FIELDS: ClassVar[tuple[str, ...]] = ("workers", "sample_batch")

    def __post_init__(self):
        if not self.sizes and not self.scales:
            raise ValueError("evaluation needs at least one size (sizes, or scales of the input side)")
        if any(scale < 1 for scale in self.scales):
            raise ValueError(f"scales must be ≥ 1, got {self.scales}")
        for height, width in self.sizes:
            if height < self.patch_size or width < self.patch_size:
                raise ValueError(f"size {height}x{width} is smaller than the {self.patch_size}² FIDp patch")
        if self.patch_mode not in ("random", "grid"):
            raise ValueError(f"patch_mode must be 'random' or 'grid', got {self.patch_mode!r}")
        if self.baseline_resample not in ("lanczos", "bicubic"):
            raise ValueError(
                f"baseline_resample must be 'lanczos' or 'bicubic', got {self.baseline_resample!r}"
            )
        for name in (
            "max_images",
            "patches_per_image",
            "chunk_images",
            "decode_batch",
            "sample_batch",
            "workers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")

    def at_input_side(self, input_side: int) -> EvalConfig:
        """The config with concrete sizes: `scales` × the encoder's input side when no sizes are given."""
        if self.sizes:
            return dataclasses.replace(self, scales=())
        sizes = tuple((scale * input_side, scale * input_side) for scale in self.scales)
        return dataclasses.replace(self, sizes=sizes, scales=())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvalConfig:
        data = dict(data)
        data["sizes"] = tuple(tuple(size) for size in data.get("sizes", cls.sizes))
        data["scales"] = tuple(data.get("scales", ()))
        return cls(**data)


PAPER = EvalConfig()
# CPU scale, the embedded workflow's task: the held-out crops decoded at 1×, 2× and 4× the encoder's input
# side (the last beyond stage 1's range), whatever side the latent stage used; Inception sees 32² patches
# upsampled, so FIDp here only ranks decoders. Inception is most of the stage's time (15 of its passes per
# image and size with 4 patches), so 2 patches per image: FIDp/sFIDp on 48 patches per decoder and size for
# the demo's 24 held-out images, already far fewer than the 2048 feature dimensions either way (the Fréchet
# distance is rank-limited at 96 as at 48): a noisier estimate of the same quantity. One actor with every core
# (ChunkScorer's threads) rather than two actors loading four models each.
EMBEDDED = EvalConfig(
    sizes=(), scales=(1, 2, 4), max_images=64, patch_size=32,
    patches_per_image=2,
    kid_subset_size=50, chunk_images=8, decode_batch=8, workers=1, grid_images=3,
)  # fmt: skip
PRESETS = {"paper": PAPER, "embedded": EMBEDDED}
