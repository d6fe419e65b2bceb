"""`infgen train`: one training stage of the decoder on Ray Train with DeepSpeed, tracked in MLflow.

    infgen train --preset stage1 --latents LATENTS --images OUT/images --output RUNS/stage1
    infgen train --preset stage2 ... --output RUNS/stage2 --init-from RUNS/stage1/final_decoder

Rerunning the same command (same --output) resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jobs.context import RunContext
from jobs.options import names_in, option, overrides

# How the stage runs, not what it makes: changing these resumes (the config's own list).
RESOURCE_FIELDS = names_in("pipelines.training.config", "TrainConfig.RESOURCE_FIELDS")


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    preset: str = option(
        choices=names_in("pipelines.training.config", "PRESETS"), help="stage config (-small: CPU scale)"
    )
    latents: str = option(help="the latent stage's output folder")
    images: str = option(help="the ingest stage's images/ folder")
    init_from: str | None = option(
        None, help="decoder directory to start from (stage 2: stage 1's final_decoder)"
    )
    steps: int | None = option(None, help="override the preset's number of steps")
    workers: int | None = option(None, help="override the preset's number of workers")
    checkpoint_every: int | None = option(None, help="override how often a checkpoint is reported (steps)")
    gan_start_step: int | None = option(
        None, help="override the step the GAN term starts at (a fraction of --steps)"
    )
    output: str = option(help="the run's folder: checkpoints, losses, final_decoder/, manifest.json")


def build_config(options: TrainOptions):
    from pipelines.training.config import PRESETS

    # bad values fail here, before Ray starts
    fields = {"steps": "steps", "workers": "num_workers", "checkpoint_every": "checkpoint_every"}
    config = dataclasses.replace(PRESETS[options.preset], **overrides(options, fields))
    if options.gan_start_step is not None:
        config = config.with_gan_start(options.gan_start_step)
    return config


def run_train_command(options: TrainOptions, context: RunContext) -> dict:
    import os

    from pipelines.common.files import resolve_inputs
    from pipelines.training.stage import run_training

    config = build_config(options)
    resolve_inputs([options.latents], "latents")
    resolve_inputs([options.images], "images")
    if options.init_from and not os.path.isdir(options.init_from):
        raise FileNotFoundError(f"--init-from {options.init_from} is not a decoder directory")
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise probe for CUDA
    context.connect_ray()
    return run_training(config, options.latents, options.images, options.output, context.tracking(),
                        init_from=options.init_from)  # fmt: skip
