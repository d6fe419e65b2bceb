"""The latent stage's typed configuration and its presets (the paper's two stages and the embedded demo)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from pipelines.common.crops import CropPolicy


@dataclass(frozen=True)
class LatentConfig:
    policy: CropPolicy = field(default_factory=CropPolicy)
    samples_per_image: int = 4
    seed: int = 0
    vae: str | None = None  # diffusers AutoencoderKL dir or hub id; None → the embedded offline substitute
    batch_size: int = 32  # encoder batch
    encoders: int = 2  # actors in the pool (one GPU each when GPUs exist)
    # Host memory each actor asks Ray for, so that a node is not packed with more encoders than it holds.
    # Measured: 2.6 GiB for a batch of 32 at 512² on the CPU with the substitute VAE; SD-VAE on the CPU
    # needs more (raise it or lower batch_size); on a GPU the activations live in GPU memory.
    encoder_memory_gib: float = 4.0
    # Images never trained on, for the evaluation (pipelines/common/holdout.py); 0.2 % of 5M is 10k images.
    holdout_fraction: float = 0.002
    mlflow_experiment: str = "infgen-latents"
    # How the stage runs, not what it makes: a resume may change these (pipelines/common/stage_output.py).
    RESOURCE_FIELDS: ClassVar[tuple[str, ...]] = ("encoders", "encoder_memory_gib")

    def __post_init__(self):
        if self.samples_per_image < 1 or self.batch_size < 1 or self.encoders < 1:
            raise ValueError(f"latent config needs samples_per_image, batch_size, encoders ≥ 1: {self}")
        if self.encoder_memory_gib <= 0:
            raise ValueError(f"encoder_memory_gib must be > 0, got {self.encoder_memory_gib}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LatentConfig:
        data = dict(data)
        try:
            return cls(policy=CropPolicy(**data.pop("policy", {})), **data)
        except TypeError as error:
            raise ValueError(f"latent config does not match this version: {error}") from None


# Stage 1 of the paper: 512² crops → 4×64×64 latents, targets up to 1024 (the CropPolicy defaults).
STAGE1 = LatentConfig()
# Stage 2: the same inputs, targets up to 2048.
STAGE2 = LatentConfig(policy=CropPolicy(max_side=2048))
# The demo (jobs/demo.yaml) on 2 CPU cores: 128² crops → 16×16 latents, targets 128–512 (1× to 4×) in coarse
# buckets so that a couple of hundred images fill whole batches of one target size. Stage 1 trains on the
# targets up to 256 (TrainConfig.max_target_side), stage 2 on all of them.
EMBEDDED = LatentConfig(
    policy=CropPolicy(input_side=128, min_side=128, max_side=512, step=128),
    samples_per_image=4,
    batch_size=16,
    encoder_memory_gib=1.0,
    holdout_fraction=0.2,  # enough held out for the demo's evaluation to mean something
)
# The smallest geometry that exercises every path (the test suite): 64² crops → 8×8 latents, targets 64–128.
SMOKE = dataclasses.replace(EMBEDDED, policy=CropPolicy(input_side=64, min_side=64, max_side=128, step=32))
PRESETS = {"stage1": STAGE1, "stage2": STAGE2, "embedded": EMBEDDED, "smoke": SMOKE}
