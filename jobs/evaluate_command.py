"""`infgen evaluate`: InfGen vs the stock VAE decoder + resize on held-out images and on latents dumped by
diffusion models, at several sizes: FID/KID/sFID, FIDp/sFIDp, precision/recall, PSNR/SSIM/LPIPS (Ray).

    infgen evaluate --decoder RUNS/stage2/final_decoder --images OUT/images --latents LATENTS --output EVAL \\
        [--latent-file dit=DIT_SAMPLES.npz ...] [--diffusers-pipeline dit=DIT_DIR ...] \\
        [--images-dir PHOTOS] [--preset paper|embedded]

With --latents, the held-out images are those the latent stage kept out, encoded with its VAE at its input
side. Without it every image of --images is evaluated (an ingest kept apart), encoded as --vae and
--input-side say. --images-dir adds a folder of image files (real photographs: `infgen photos`), cropped and
encoded the same way and scored against their own ground truth. Rerunning the same command after a crash
scores only the missing chunks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jobs.context import RunContext
from jobs.options import names_in, option, overrides

# How the stage runs, not what it makes: changing these resumes (the config's own list).
RESOURCE_FIELDS = names_in("pipelines.evaluation.config", "EvalConfig.RESOURCE_FIELDS")


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions:
    decoder: str = option(help="InfGen decoder directory (e.g. train's final_decoder)")
    images: str = option(help="the ingest stage's images/ folder (ground truth)")
    latents: str | None = option(
        None, help="the latent stage's output: its held-out images are evaluated (default: all images)"
    )
    images_dir: str | None = option(
        None,
        help="a folder of image files (png/jpg/webp...), e.g. `infgen photos`: scored as the source "
        "'photos' against their own ground truth (PSNR/SSIM/LPIPS)",
    )
    preset: str = option(
        "paper", choices=names_in("pipelines.evaluation.config", "PRESETS"), help="sizes and patch protocol"
    )
    sizes: list[str] = option([], help="target sizes, e.g. 512 1024 768x1344 (default: the preset's)")
    latent_file: list[str] = option(
        [], repeat=True, metavar="NAME=PATH",
        help="scaled latents (N, C, h, w) in .npy/.npz/.pt/.parquet, e.g. dit=samples.npz (repeatable)",
    )  # fmt: skip
    diffusers_pipeline: list[str] = option(
        [], repeat=True, metavar="NAME=DIR",
        help="a local diffusers pipeline (e.g. DiTPipeline) to sample latents from (repeatable)",
    )  # fmt: skip
    max_images: int | None = option(None, help="images per source (paper preset: 10,000)")
    patches_per_image: int | None = option(None, help="FIDp/sFIDp patches per image (paper: 10)")
    patch_mode: str | None = option(None, choices=("random", "grid"), help="patch positions (default random)")
    vae: str | None = option(
        None, help="without --latents: the stock VAE (diffusers dir or hub id; default: embedded substitute)"
    )
    input_side: int | None = option(
        None, help="without --latents: the encoder input side of the held-out crops"
    )
    inception: str | None = option(
        None, help="clean-fid's inception-2015-12-05.pt (default: its usual place)"
    )
    lpips_trunk: str | None = option(None, help="torchvision AlexNet weights for LPIPS")
    workers: int | None = option(None, help="evaluation actors (one GPU each when there are GPUs)")
    sample_batch: int | None = option(None, help="samples per diffusers pipeline call (default 64)")
    seed: int = option(0, help="patch positions and sampled latents")
    output: str = option(help="evaluation folder (local or fsspec URL)")


def named_paths(values: list[str], option_name: str) -> dict[str, str]:
    named = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise ValueError(f"{option_name} {value!r}: expected NAME=PATH")
        if name in named:
            raise ValueError(f"{option_name}: the name {name!r} is given twice")
        named[name] = path
    return named


def build_config(options: EvaluateOptions):
    from infgen.decode import parse_size
    from pipelines.evaluation.config import PRESETS

    changes = {"seed": options.seed, "inception": options.inception, "lpips_trunk": options.lpips_trunk}
    if options.sizes:
        changes["sizes"] = tuple(parse_size(s if "x" in s else f"{s}x{s}") for s in options.sizes)
        changes["scales"] = ()  # given sizes replace a preset's multiples of the input side
    names = ("max_images", "patches_per_image", "patch_mode", "workers", "sample_batch")
    changes.update(overrides(options, {name: name for name in names}))
    return dataclasses.replace(PRESETS[options.preset], **changes)


def run_evaluate_command(options: EvaluateOptions, context: RunContext) -> dict:
    from pipelines.common.files import resolve_inputs
    from pipelines.evaluation.stage import run_evaluation

    config = build_config(options)  # bad values fail before a cluster is started or joined
    latent_files = named_paths(options.latent_file, "--latent-file")
    pipelines = named_paths(options.diffusers_pipeline, "--diffusers-pipeline")
    resolve_inputs([options.images], "images")
    context.connect_ray()
    manifest = run_evaluation(
        options.decoder, options.images, options.output, config, latents=options.latents,
        latent_files=latent_files, pipelines=pipelines, tracking=context.tracking(), vae=options.vae,
        input_side=options.input_side, images_dir=options.images_dir,
    )  # fmt: skip
    if "://" not in options.output and context.parent_run_id is None:  # a workflow prints it at its end
        print(open(f"{options.output.rstrip('/')}/plugin_gains.md").read())
    return manifest
