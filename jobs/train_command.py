"""`infgen train`: one training stage of the decoder on Ray Train with DeepSpeed, tracked in MLflow.

    infgen train --preset stage1 --latents LATENTS --images OUT/images --output RUNS/stage1
    infgen train --preset stage2 ... --output RUNS/stage2 --continue-from RUNS/stage1

`--continue-from RUN` continues a finished run: its decoder, EMA, discriminator and optimizer state carry
(pipelines/training/continuation.py). `--init-from DECODER` starts from a decoder folder's weights only.
Rerunning the same command (same --output) resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jobs.context import RunContext
from jobs.options import names_in, option, overrides

# {option: the config field it overrides} for the options that replace one field of the preset.
CONFIG_FIELDS = {
    "workers": "num_workers",
    "micro_batch_limit": "micro_batch_limit",
    "max_failures": "max_failures",
    "checkpoint_every": "checkpoint_every",
    "warm_start": "warm_start",
}


def RESOURCE_FIELDS() -> tuple[str, ...]:  # noqa: N802 (the name every stage command gives its list)
    """The options that set a resource field of the config (how the stage runs, not what it makes: changing
    them resumes, and a workflow leaves them out of the stage's config hash)."""
    from pipelines.training.config import TrainConfig

    return tuple(option for option, field in CONFIG_FIELDS.items() if field in TrainConfig.RESOURCE_FIELDS)


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    preset: str = option(
        choices=names_in("pipelines.training.config", "PRESETS"), help="stage config (-small: CPU scale)"
    )
    latents: str = option(help="the latent stage's output folder")
    images: str = option(help="the ingest stage's images/ folder")
    init_from: str | None = option(
        None, help="decoder folder (infgen.save) to start from: its weights only, fresh discriminator"
    )
    continue_from: str | None = option(
        None,
        help="a finished training run's --output folder to continue (stage 2: stage 1's): its decoder, "
        "EMA, discriminator and optimizer state",
    )
    warm_start: str | None = option(
        None,
        choices=("vae", "none"),
        help="how a fresh run's pixel decoder starts: as the latent record's VAE decoder (vae, the presets' "
        "default) or from random weights (none)",
    )
    steps: int | None = option(None, help="override the preset's number of steps")
    workers: int | None = option(
        None,
        help="override the preset's number of workers (a resource: a rerun with another count resumes from "
        "the last checkpoint, on the same global batches)",
    )
    micro_batch_limit: int | None = option(
        None,
        help="the most samples one worker decodes at once (default: no limit); above it the worker "
        "accumulates gradients over several micro batches",
    )
    max_failures: int | None = option(
        None,
        help="worker errors (a lost worker or node) one run recovers from, each from the last checkpoint "
        "(-1: no limit; default: the preset's)",
    )
    checkpoint_every: int | None = option(None, help="override how often a checkpoint is reported (steps)")
    gan_start_step: int | None = option(
        None,
        help="override the step the GAN term starts at (below --steps; default: the preset's fraction "
        "of the run)",
    )
    gpu: bool = option(
        False,
        help="train on GPU workers (one GPU each, NCCL) even where the preset is a CPU one (-small, -demo), "
        "e.g. bench/gpu_demo.yaml on a GPU machine",
    )
    output: str = option(help="the run's folder: checkpoints, losses, final_decoder/, manifest.json")


def build_config(options: TrainOptions):
    from pipelines.training.config import PRESETS

    # bad values fail here: before Ray starts, and when a workflow file loads (registry.Command.check)
    config = dataclasses.replace(PRESETS[options.preset], **overrides(options, CONFIG_FIELDS))
    if options.gpu:  # a flag: it can only turn GPUs on (the full presets already have them)
        config = dataclasses.replace(config, use_gpu=True)
    if options.steps is not None:  # the GAN start keeps its fraction of the run unless given
        return config.with_steps(options.steps, options.gan_start_step)
    if options.gan_start_step is not None:
        config = config.with_gan_start(options.gan_start_step)
    return config


def run_train_command(options: TrainOptions, context: RunContext) -> dict:
    import os

    from pipelines.common.files import resolve_inputs
    from pipelines.training.continuation import check_decoder_folder, find_continuation
    from pipelines.training.stage import run_training

    config = build_config(options)
    resolve_inputs([options.latents], "latents")
    resolve_inputs([options.images], "images")
    if options.init_from and options.continue_from:
        raise ValueError("--init-from and --continue-from exclude each other: give one")
    if options.init_from:  # the full checks run again in run_training; these fail before Ray starts
        check_decoder_folder(options.init_from)
    if options.continue_from:
        find_continuation(options.continue_from)
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise probe for CUDA
    context.connect_ray()
    return run_training(config, options.latents, options.images, options.output, context.tracking(),
                        init_from=options.init_from, continue_from=options.continue_from)  # fmt: skip
