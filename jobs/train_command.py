"""`infgen train`: one training stage of the decoder on Ray Train with DeepSpeed, tracked in MLflow.

    infgen train --preset stage1 --latents LATENTS --images OUT/images --storage RUNS --name stage1
    infgen train --preset stage2 ... --name stage2 --init-from RUNS/stage1/final_decoder

Rerunning the same command (same --storage and --name) resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse

from jobs.stage_tracking import add_tracking_arguments

PRESET_NAMES = ("stage1", "stage2", "stage1-small", "stage2-small")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=PRESET_NAMES, required=True, help="stage config (-small: CPU scale)"
    )
    parser.add_argument("--latents", required=True, help="the latent stage's output folder")
    parser.add_argument("--images", required=True, help="the ingest stage's images/ folder")
    parser.add_argument("--storage", default="runs/train", help="Ray Train storage path (checkpoints, logs)")
    parser.add_argument("--name", help="run name under --storage (default: the preset's name)")
    parser.add_argument(
        "--init-from", help="decoder directory to start from (stage 2: stage 1's final_decoder)"
    )
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--workers", type=int, help="override the preset's number of workers")
    parser.add_argument(
        "--checkpoint-every", type=int, help="override how often a checkpoint is reported (steps)"
    )
    parser.add_argument(
        "--gan-start-step", type=int, help="override the step the GAN term starts at (a fraction of --steps)"
    )
    parser.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else embedded)")
    add_tracking_arguments(parser)


def run_train_command(args: argparse.Namespace) -> dict:
    import dataclasses
    import os

    from jobs.ray_session import connect_ray
    from pipelines.ingest.manifest import resolve_inputs
    from pipelines.tracking import default_tracking_uri
    from pipelines.training.config import PRESETS
    from pipelines.training.stage import run_training

    config = PRESETS[args.preset]
    overrides = {"steps": "steps", "workers": "num_workers", "checkpoint_every": "checkpoint_every",
                 "gan_start_step": "gan_start_step"}  # fmt: skip
    changes = {field: getattr(args, option) for option, field in overrides.items()
               if getattr(args, option) is not None}  # fmt: skip
    if args.experiment:
        changes["mlflow_experiment"] = args.experiment
    config = dataclasses.replace(config, **changes)  # bad values fail here, before Ray starts
    resolve_inputs([args.latents])
    resolve_inputs([args.images])
    if args.init_from and not os.path.isdir(args.init_from):
        raise FileNotFoundError(f"--init-from {args.init_from} is not a decoder directory")
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise probe for CUDA
    connect_ray(args.ray_address)
    result = run_training(
        config,
        args.latents,
        args.images,
        args.storage,
        args.name or args.preset,
        args.tracking_uri or default_tracking_uri(),
        init_from=args.init_from,
        parent_run_id=args.parent_run_id,
    )
    print(f"train: final EMA decoder in {result['decoder']} (MLflow run {result['mlflow_run_id']})")
    return result
