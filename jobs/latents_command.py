"""`infgen latents`: ingest image shards → frozen-VAE latent shards (Ray Data actor pool), with a manifest.

    infgen latents --images OUT/images --output LATENTS [--preset stage1|stage2|embedded] [--vae VAE_DIR]

Rerunning the same command after a crash resumes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jobs.context import RunContext
from jobs.options import names_in, option, overrides

# How the stage runs, not what it makes: changing these resumes (the config's own list).
RESOURCE_FIELDS = names_in("pipelines.latents.config", "LatentConfig.RESOURCE_FIELDS")


@dataclass(frozen=True, kw_only=True)
class LatentsOptions:
    images: str = option(help="the ingest stage's images/ folder (local or fsspec URL)")
    preset: str = option(
        "stage1",
        choices=names_in("pipelines.latents.config", "PRESETS"),
        help="crop policy and sizes (default stage1)",
    )
    vae: str | None = option(
        None, help="diffusers AutoencoderKL dir or hub id (default: embedded offline substitute)"
    )
    samples_per_image: int | None = option(None, help="crops per image (stage presets: 4)")
    seed: int = option(0, help="crop and hold-out seed")
    holdout_fraction: float | None = option(
        None, help="images kept out of training for evaluation (default 0.002)"
    )
    encoders: int | None = option(None, help="VAE actors (one GPU each when there are GPUs; default 2)")
    encoder_memory_gib: float | None = option(
        None, help="host memory each VAE actor reserves in Ray (default 4; 1 for the embedded preset)"
    )
    output: str = option(help="latent shard folder (local or fsspec URL)")


def build_config(options: LatentsOptions):
    from pipelines.latents.config import PRESETS

    names = ("samples_per_image", "encoders", "encoder_memory_gib", "holdout_fraction")
    changes = {"seed": options.seed, "vae": options.vae, **overrides(options, {name: name for name in names})}
    return dataclasses.replace(PRESETS[options.preset], **changes)


def run_latents_command(options: LatentsOptions, context: RunContext) -> dict:
    from pipelines.common.files import resolve_inputs
    from pipelines.latents.stage import run_latents

    config = build_config(options)  # bad values fail before a cluster is started or joined
    resolve_inputs([options.images], "images")
    context.connect_ray()
    return run_latents(options.images, options.output, config, tracking=context.tracking())
