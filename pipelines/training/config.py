"""Training configuration: one typed tree per stage; the DeepSpeed JSON is generated from it, never written by
hand (so precision, batch and clipping cannot disagree between our loop and DeepSpeed's).

What the latents fix is not restated here: the decoder's latent channels, its in-distribution scale and the
default validation sizes come from the latent stage's record (pipelines/common/latent_record.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from infgen.discriminator import DiscriminatorConfig
from infgen.losses import LossConfig


@dataclass(frozen=True)
class OptimizerConfig:
    peak_lr: float = 2e-4
    final_lr: float = 1e-5
    warmup_steps: int = 5_000
    # A stage that continues a finished one (`infgen train --continue-from`) carries its AdamW moments, so
    # its LR needs no warm-up from zero: it ramps from final_lr (where the previous stage's cosine ended) to
    # peak_lr over this many steps; 0 restarts at the peak at once (a warm restart). docs/paper.md, "Defaults
    # where the paper is silent".
    continued_warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    discriminator_lr: float = 1e-4
    discriminator_betas: tuple[float, float] = (0.5, 0.9)
    gradient_clipping: float = 1.0


def batch_split(global_batch: int, workers: int, micro_batch_limit: int | None = None) -> tuple[int, int]:
    """(micro batch, accumulation steps) with micro batch × accumulation × workers = global batch: every
    worker takes an equal share of each global batch, in as few micro batches as the limit allows. Shares
    must be equal (DeepSpeed averages the workers' gradients with equal weights), so the worker count must
    divide the global batch; the error names the counts that do."""
    if workers < 1:
        raise ValueError(f"num_workers must be ≥ 1, got {workers}")
    if global_batch < 1:
        raise ValueError(f"global_batch must be ≥ 1, got {global_batch}")
    if micro_batch_limit is not None and micro_batch_limit < 1:
        raise ValueError(f"micro_batch_limit must be ≥ 1 (or None: no limit), got {micro_batch_limit}")
    if global_batch % workers:
        counts = [count for count in range(1, global_batch + 1) if global_batch % count == 0]
        raise ValueError(
            f"global_batch {global_batch} is not divisible by num_workers {workers}: every worker takes an "
            f"equal share of each batch; worker counts that work: {', '.join(map(str, counts))}"
        )
    share = global_batch // workers
    accumulation = next(
        steps
        for steps in range(1, share + 1)
        if share % steps == 0 and (micro_batch_limit is None or share // steps <= micro_batch_limit)
    )
    return share // accumulation, accumulation


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "stage1"
    model_preset: str = "paper"
    model_overrides: dict = field(default_factory=dict)
    steps: int = 500_000
    global_batch: int = 32
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema_decay: float = 0.9999
    # L1 + 0.1·LPIPS + 0.1·GAN (docs/paper.md, "Training"); LPIPS and the discriminator see random crops of
    # loss.perceptual_crop (memory at 2048²); GroupNorm in 16 groups so the small discriminators divide.
    loss: LossConfig = field(
        default_factory=lambda: LossConfig(discriminator=DiscriminatorConfig(norm_groups=16))
    )
    activation_checkpointing: bool = True  # paper@1024² batch 4 peaks at 129 GiB without (bench/README.md)
    # A fresh run's pixel decoder starts as the frozen VAE's decoder ("vae", pipelines/training/warm_start.py)
    # or from random weights ("none"). Ignored when the run starts from a decoder or continues a run.
    warm_start: str = "vae"
    # Train only on target sizes whose sides are at most this (None: every size the latents have): stage 1
    # and stage 2 can share one latent folder, stage 1 on the smaller targets.
    max_target_side: int | None = None
    # Decode and score one random window of at most this side per batch (None: whole targets). The window's
    # pixels are the whole decode's (InfGen.decode_window): it is decoded with the pixel decoder's halo
    # (receptive_radius_cells: 14 cells for `tiny`), so it saves work only on targets much larger than
    # window + 2·halo, e.g. 1024² windows of 2048² targets (37 % of the pixels). L1 sees the window; LPIPS and
    # the GAN see crops of it (loss.perceptual_crop).
    train_window: int | None = None
    precision: str = "bf16"  # "bf16" or "fp32" ("fp16" is not supported on CPU, and bf16 is safer on GPU)
    zero_stage: int = 1
    num_workers: int = 8
    # The most samples one worker decodes in one forward/backward (None: no limit). Above it, each worker
    # accumulates gradients over several micro batches; the global batch, and so the training, stays the same.
    micro_batch_limit: int | None = None
    # Worker errors (a lost worker or node) Ray Train recovers from within one run, each time restarting the
    # workers from the last checkpoint; -1: no limit, 0: the first error ends the run.
    max_failures: int = 3
    use_gpu: bool = True
    checkpoint_every: int = 5_000
    log_every: int = 50  # MLflow metrics every this many steps
    print_every: int = 50  # a progress line every this many steps (and at the last)
    # Decoded for the MLflow grid at the end; None: the latent record's (1×, largest square, widest).
    validation_sizes: tuple[tuple[int, int], ...] | None = None
    seed: int = 0
    mlflow_experiment: str = "infgen-train"
    # How the stage runs, not what it trains: a resume may change these (pipelines/common/stage_output.py).
    # The worker count among them: a checkpoint loads on another one (pipelines/training/resharding.py) and
    # the global batch stays the same samples (`batch_split`).
    RESOURCE_FIELDS: ClassVar[tuple[str, ...]] = (
        "checkpoint_every", "log_every", "print_every", "num_workers", "micro_batch_limit", "max_failures",
    )  # fmt: skip

    def __post_init__(self):
        if self.train_window is not None and self.train_window < 8:
            raise ValueError(f"train_window must be at least 8 pixels (one token), got {self.train_window}")
        if self.warm_start not in ("vae", "none"):
            raise ValueError(f"warm_start must be 'vae' or 'none', got {self.warm_start!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be ≥ 0, or -1 for no limit; got {self.max_failures}")
        batch_split(self.global_batch, self.num_workers, self.micro_batch_limit)  # a clear error if none
        for name in ("steps", "checkpoint_every", "log_every", "print_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.loss.gan_start_step < 0:
            raise ValueError(f"loss.gan_start_step must be ≥ 0, got {self.loss.gan_start_step}")
        if self.loss.gan_weight > 0 and self.loss.gan_start_step >= self.steps:
            raise ValueError(
                f"loss.gan_start_step ({self.loss.gan_start_step}) must be below steps ({self.steps}): the "
                "GAN term would never start (give a GAN start below the steps, or a GAN weight of 0)"
            )

    @property
    def micro_batch(self) -> int:
        """Samples per worker per forward/backward."""
        return batch_split(self.global_batch, self.num_workers, self.micro_batch_limit)[0]

    @property
    def accumulation_steps(self) -> int:
        """Micro batches per worker per optimizer step."""
        return batch_split(self.global_batch, self.num_workers, self.micro_batch_limit)[1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        optimizer = dict(data.pop("optimizer", {}))
        for key in ("betas", "discriminator_betas"):
            if key in optimizer:
                optimizer[key] = tuple(optimizer[key])
        if data.get("validation_sizes") is not None:
            data["validation_sizes"] = tuple(tuple(size) for size in data["validation_sizes"])
        loss = dict(data.pop("loss", {}))
        loss["discriminator"] = DiscriminatorConfig(**loss.get("discriminator", {}))
        return cls(optimizer=OptimizerConfig(**optimizer), loss=LossConfig(**loss), **data)

    def with_gan_start(self, step: int) -> TrainConfig:
        return dataclasses.replace(self, loss=dataclasses.replace(self.loss, gan_start_step=step))

    def with_steps(self, steps: int, gan_start_step: int | None = None) -> TrainConfig:
        """`steps` steps; the GAN starts at `gan_start_step`, else at the same fraction of the run as before
        (a preset's 50k of 500k becomes 1 of 12), so shortening a run never silently drops its GAN term."""
        if gan_start_step is None:
            gan_start_step = self.loss.gan_start_step * steps // self.steps
        return dataclasses.replace(
            self, steps=steps, loss=dataclasses.replace(self.loss, gan_start_step=gan_start_step)
        )

    def deepspeed_config(self, discriminator: bool = False, load_universal: bool = False) -> dict:
        """DeepSpeed's JSON for the generator (or the discriminator) engine. `load_universal`: the engine
        will load a universal checkpoint (another worker count's, converted: training/resharding.py)."""
        optimizer = self.optimizer
        lr, betas = (
            (optimizer.discriminator_lr, optimizer.discriminator_betas)
            if discriminator
            else (optimizer.peak_lr, optimizer.betas)
        )
        config = {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.accumulation_steps,
            "train_batch_size": self.global_batch,
            "gradient_clipping": optimizer.gradient_clipping,
            "zero_optimization": {"stage": self.zero_stage},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": lr,
                    "betas": list(betas),
                    "weight_decay": 0.0 if discriminator else optimizer.weight_decay,
                    "torch_adam": True,  # torch's AdamW: no cpu_adam JIT build, runs on CPU and GPU
                },
            },
            "bf16": {"enabled": self.precision == "bf16"},
            "steps_per_print": 10**9,  # progress is ours (and MLflow's)
            "wall_clock_breakdown": False,
        }
        if load_universal:
            config["checkpoint"] = {"load_universal": True}
        return config


STAGE1 = TrainConfig()
STAGE2 = dataclasses.replace(
    STAGE1, stage="stage2", steps=100_000, global_batch=8, checkpoint_every=2_000,
).with_gan_start(0)  # fmt: skip
# The same two stages at the test suite's scale: tiny model, 8×8 latents → ≤ 128² targets, 2 workers, fp32.
STAGE1_SMALL = dataclasses.replace(
    STAGE1, stage="stage1-small", model_preset="tiny",
    steps=12, global_batch=4, num_workers=2, max_failures=1, use_gpu=False, precision="fp32", zero_stage=0,
    activation_checkpointing=False, checkpoint_every=4, log_every=1, print_every=10, train_window=96,
    ema_decay=0.9, optimizer=OptimizerConfig(peak_lr=1e-3, final_lr=5e-5, warmup_steps=2),
    loss=LossConfig(gan_start_step=6, perceptual_crop=32,
                    discriminator=DiscriminatorConfig(base_channels=16, norm_groups=16)),
)  # fmt: skip
STAGE2_SMALL = dataclasses.replace(
    STAGE1_SMALL, stage="stage2-small", steps=8, global_batch=2
).with_gan_start(0)
# The demo's two stages (jobs/demo.yaml) on one latent folder of 16×16 latents: stage 1 on targets ≤ 256²
# (≤ 2×), stage 2 continues it on every target (≤ 512², 4×). A recipe that converges in minutes on 2 CPU
# cores, from the warm-started pixel decoder (docs/paper.md, "Defaults where the paper is silent"): lr 3e-4
# with a real warm-up (1e-3 and 3e-3 trained slower or diverged), a clip that only catches spikes (a clip of
# 1.0 was on at every step and slowed training: gradient norms ran at 1.6-2.4), the GAN from 60 % of stage 1.
STAGE1_DEMO = dataclasses.replace(
    STAGE1_SMALL, stage="stage1-demo", steps=200, global_batch=2, max_target_side=256, train_window=None,
    checkpoint_every=50, log_every=5, print_every=25, ema_decay=0.98,
    optimizer=OptimizerConfig(peak_lr=3e-4, final_lr=3e-5, warmup_steps=20, gradient_clipping=5.0),
    loss=dataclasses.replace(STAGE1_SMALL.loss, gan_start_step=120, perceptual_crop=128),
)  # fmt: skip
STAGE2_DEMO = dataclasses.replace(
    STAGE1_DEMO, stage="stage2-demo", steps=50, max_target_side=None, checkpoint_every=25, print_every=10,
    loss=dataclasses.replace(STAGE1_DEMO.loss, gan_start_step=0),
)  # fmt: skip
PRESETS = {
    "stage1": STAGE1,
    "stage2": STAGE2,
    "stage1-small": STAGE1_SMALL,
    "stage2-small": STAGE2_SMALL,
    "stage1-demo": STAGE1_DEMO,
    "stage2-demo": STAGE2_DEMO,
}
