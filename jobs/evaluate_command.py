"""`infgen evaluate`: InfGen vs the stock VAE decoder + resize on held-out images and on latents dumped by
diffusion models, at several sizes: FID/KID/sFID, FIDp/sFIDp, precision/recall, PSNR/SSIM/LPIPS (Ray).

    infgen evaluate --decoder RUNS/stage2/final_decoder --images OUT/images --latents LATENTS --output EVAL \\
        [--latent-file dit=DIT_SAMPLES.npz ...] [--diffusers-pipeline dit=DIT_DIR ...] \\
        [--preset paper|embedded]

Rerunning the same command after a crash scores only the missing chunks.
"""

from __future__ import annotations

import argparse
import dataclasses

from jobs.stage_tracking import add_tracking_arguments

PRESETS = ("paper", "embedded")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--decoder", required=True, help="InfGen decoder directory (e.g. train's final_decoder)"
    )
    parser.add_argument("--images", required=True, help="the ingest stage's images/ folder (ground truth)")
    parser.add_argument(
        "--latents", help="the latent stage's output: its held-out images are evaluated (default: all images)"
    )
    parser.add_argument("--output", required=True, help="evaluation folder (local or fsspec URL)")
    parser.add_argument("--preset", choices=PRESETS, default="paper", help="sizes and patch protocol")
    parser.add_argument("--sizes", nargs="+", help="target sizes, e.g. 512 1024 768x1344 (default: preset's)")
    parser.add_argument(
        "--latent-file", action="append", default=[], metavar="NAME=PATH",
        help="scaled latents (N, 4, h, w) in .npy/.npz/.pt/.parquet, e.g. dit=samples.npz (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--diffusers-pipeline", action="append", default=[], metavar="NAME=DIR",
        help="a local diffusers pipeline (e.g. DiTPipeline) to sample latents from (repeatable)",
    )  # fmt: skip
    parser.add_argument("--max-images", type=int, help="images per source (paper preset: 10,000)")
    parser.add_argument("--patches-per-image", type=int, help="FIDp/sFIDp patches per image (paper: 10)")
    parser.add_argument("--patch-mode", choices=("random", "grid"), help="patch positions (default random)")
    parser.add_argument("--vae", help="stock VAE (diffusers dir or hub id; default: embedded substitute)")
    parser.add_argument("--inception", help="clean-fid's inception-2015-12-05.pt (default: its usual place)")
    parser.add_argument("--lpips-trunk", help="torchvision AlexNet weights for LPIPS")
    parser.add_argument("--workers", type=int, help="evaluation actors (one GPU each when there are GPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else embedded)")
    add_tracking_arguments(parser)


def named_paths(values: list[str], option: str) -> dict[str, str]:
    named = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise ValueError(f"{option} {value!r}: expected NAME=PATH")
        if name in named:
            raise ValueError(f"{option}: the name {name!r} is given twice")
        named[name] = path
    return named


def build_config(args: argparse.Namespace):
    from infgen.decode import parse_size
    from pipelines.evaluation.config import PRESETS as CONFIGS

    config = CONFIGS[args.preset]
    changes = {
        "seed": args.seed,
        "vae": args.vae,
        "inception": args.inception,
        "lpips_trunk": args.lpips_trunk,
    }
    if args.sizes:
        changes["sizes"] = tuple(parse_size(s if "x" in s else f"{s}x{s}") for s in args.sizes)
    for name in ("max_images", "patches_per_image", "patch_mode", "workers"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return dataclasses.replace(config, **changes)


def evaluation_tracker(args: argparse.Namespace):
    """Logs the table (MLflow table artifact + markdown), one metric per row and metric, and the grids."""
    import json
    import tempfile
    from pathlib import Path

    from pipelines.tracking import default_tracking_uri, log_stage_run

    uri = args.tracking_uri or default_tracking_uri()

    def track(manifest: dict, manifest_path: str) -> None:
        import fsspec
        from PIL import Image

        out = manifest_path.rsplit("/", 1)[0]
        rows = manifest["rows"]
        metrics = {}
        for row in rows:
            for name, value in row.items():
                if isinstance(value, float) and value == value and abs(value) != float("inf"):
                    metrics[f"{row['source']}.{row['size']}.{row['decoder']}.{name}".replace("+", "_")] = (
                        value
                    )

        def extra(mlflow) -> None:
            columns = sorted({key for row in rows for key in row})
            mlflow.log_table(
                {c: [row.get(c) for row in rows] for c in columns}, artifact_file="plugin_gains.json"
            )
            mlflow.log_text(fsspec.open(f"{out}/plugin_gains.md", "r").open().read(), "plugin_gains.md")
            filesystem, root = fsspec.core.url_to_fs(out)
            for path in sorted(filesystem.glob(f"{root}/grids/*.png")):
                with filesystem.open(path, "rb") as handle:
                    image = Image.open(handle).convert("RGB")
                mlflow.log_image(image, artifact_file=f"grids/{path.rsplit('/', 1)[-1]}")
            mlflow.set_tags(
                {
                    "infgen.feature_extractor": manifest["feature_extractor"],
                    "infgen.lpips_trunk_pretrained": str(manifest["lpips_trunk_pretrained"]),
                }
            )

        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / "manifest.json"
            local.write_text(json.dumps(manifest, indent=2))
            run_id = log_stage_run(
                uri, args.experiment or manifest["config"]["mlflow_experiment"], args.run_name or "evaluate",
                params={"config": manifest["config"], "decoder": manifest["inputs"]["decoder"],
                        "output": manifest_path},
                metrics=metrics, artifacts=[str(local)], parent_run_id=args.parent_run_id, extra=extra,
            )  # fmt: skip
        print(f"evaluate: MLflow run {run_id} at {uri}")

    return track


def run_evaluate_command(args: argparse.Namespace) -> dict:
    from jobs.ray_session import connect_ray
    from pipelines.evaluation.stage import run_evaluation
    from pipelines.ingest.manifest import resolve_inputs

    config = build_config(args)  # bad values fail before a cluster is started or joined
    latent_files = named_paths(args.latent_file, "--latent-file")
    pipelines = named_paths(args.diffusers_pipeline, "--diffusers-pipeline")
    resolve_inputs([args.images])
    connect_ray(args.ray_address)
    manifest = run_evaluation(args.decoder, args.images, args.output, config, latents=args.latents,
                              latent_files=latent_files, pipelines=pipelines,
                              tracking=evaluation_tracker(args))  # fmt: skip
    print(open(f"{args.output.rstrip('/')}/plugin_gains.md").read() if "://" not in args.output else "")
    return manifest
