"""`infgen latents`: ingest image shards → frozen-VAE latent shards (Ray Data actor pool), with a manifest.

    infgen latents --images OUT/images --output LATENTS [--preset stage1|stage2|embedded] [--vae VAE_DIR]

Rerunning the same command after a crash resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses

from jobs.stage_tracking import add_tracking_arguments, manifest_tracker

PRESETS = ("stage1", "stage2", "embedded")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images", required=True, help="the ingest stage's images/ folder (local or fsspec URL)"
    )
    parser.add_argument("--output", required=True, help="latent shard folder (local or fsspec URL)")
    parser.add_argument(
        "--preset", choices=PRESETS, default="stage1", help="crop policy and sizes (default stage1)"
    )
    parser.add_argument(
        "--vae", help="diffusers AutoencoderKL dir or hub id (default: embedded offline substitute)"
    )
    parser.add_argument("--samples-per-image", type=int, help="crops per image (stage presets: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--holdout-fraction", type=float, help="images kept out of training for evaluation (default 0.002)"
    )
    parser.add_argument(
        "--encoders", type=int, help="VAE actors (one GPU each when there are GPUs; default 2)"
    )
    parser.add_argument(
        "--encoder-memory-gib", type=float,
        help="host memory each VAE actor reserves in Ray (default 4; 1 for the embedded preset)",
    )  # fmt: skip
    parser.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else embedded)")
    add_tracking_arguments(parser)


def build_config(args: argparse.Namespace):
    from pipelines.latents.config import EMBEDDED, LatentConfig
    from pipelines.latents.crops import CropPolicy

    config = {
        "stage1": LatentConfig(),
        "stage2": LatentConfig(policy=CropPolicy(max_side=2048)),
        "embedded": EMBEDDED,
    }[args.preset]
    changes = {"seed": args.seed, "vae": args.vae}
    if args.samples_per_image is not None:
        changes["samples_per_image"] = args.samples_per_image
    if args.encoders is not None:
        changes["encoders"] = args.encoders
    if args.encoder_memory_gib is not None:
        changes["encoder_memory_gib"] = args.encoder_memory_gib
    if args.holdout_fraction is not None:
        changes["holdout_fraction"] = args.holdout_fraction
    return dataclasses.replace(config, **changes)


def run_latents_command(args: argparse.Namespace) -> dict:
    from jobs.ray_session import connect_ray
    from pipelines.ingest.manifest import resolve_inputs
    from pipelines.latents.stage import run_latents

    config = build_config(args)  # bad values fail before a cluster is started or joined
    resolve_inputs([args.images])
    connect_ray(args.ray_address)
    return run_latents(args.images, args.output, config, tracking=manifest_tracker(args, "latents"))
