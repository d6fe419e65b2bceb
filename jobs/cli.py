"""The `infgen` command.

    infgen decode --checkpoint CKPT --latents FILE.npy --size 2160x3840 --out out.png [--vae VAE_DIR]
    infgen ingest (--metadata META... | --embedded ROWS | --regenerate MANIFEST) --output OUT
    infgen latents --images OUT/images --output LATENTS [--preset stage1|stage2|embedded] [--vae DIR]
    infgen train --preset stage1|stage2|stage1-small|stage2-small --latents L --images I [--init-from D]
    infgen evaluate --decoder D --images I --latents L --output EVAL [--latent-file NAME=PATH ...]
    infgen run WORKFLOW.yaml [--from STAGE] [--until STAGE] [--address http://HEAD:8265]

Subcommands import their heavy dependencies only when they run, so `infgen --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipelines.errors import StageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infgen", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    decode = commands.add_parser("decode", help="decode latents to images of any size")
    decode.add_argument(
        "--checkpoint", required=True, help="InfGen checkpoint directory (config.json + weights)"
    )
    decode.add_argument("--latents", required=True, help=".npy of shape (C, h, w) or (B, C, h, w), scaled")
    decode.add_argument("--size", required=True, help="output HEIGHTxWIDTH, e.g. 2160x3840")
    decode.add_argument("--out", required=True, help="output PNG; a batch writes OUT_0.png, OUT_1.png, ...")
    decode.add_argument(
        "--vae",
        help="frozen VAE (diffusers dir or hub id) for re-encoding: needed only beyond the training range",
    )
    decode.add_argument("--device", default="cpu")
    decode.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    decode.add_argument("--query-chunk", type=int, default=16384, help="mask tokens decoded at once")
    decode.add_argument("--tile-cells", type=int, default=64, help="pixel-decoder tile side, in 8-px cells")

    from jobs.ingest_command import add_arguments as add_ingest_arguments

    ingest = commands.add_parser("ingest", help="metadata → verified >2 MP images in Parquet shards (Ray)")
    add_ingest_arguments(ingest)

    from jobs.latents_command import add_arguments as add_latents_arguments

    latents = commands.add_parser("latents", help="image shards → frozen-VAE latent shards (Ray Data)")
    add_latents_arguments(latents)

    from jobs.train_command import add_arguments as add_train_arguments

    train = commands.add_parser("train", help="one decoder training stage (Ray Train + DeepSpeed)")
    add_train_arguments(train)

    from jobs.evaluate_command import add_arguments as add_evaluate_arguments

    evaluate = commands.add_parser("evaluate", help="InfGen vs stock VAE decoder: FID/FIDp/PSNR... (Ray)")
    add_evaluate_arguments(evaluate)

    run = commands.add_parser("run", help="run a workflow file: ingest → latents → train → evaluate")
    run.add_argument("workflow", help="workflow YAML, e.g. jobs/demo.yaml")
    run.add_argument("--from", dest="first", metavar="STAGE", help="start at this stage")
    run.add_argument("--until", dest="last", metavar="STAGE", help="stop after this stage")
    run.add_argument(
        "--address", help="submit each stage as a Ray job to this cluster (http://HEAD:8265; or RAY_ADDRESS)"
    )
    return parser


def run_command(args: argparse.Namespace):
    """Run one parsed subcommand; errors propagate (the workflow runs stages through this)."""
    if args.command == "decode":
        from jobs.decode_command import run_decode

        return run_decode(args)
    if args.command == "run":
        from jobs.workflow import run_workflow

        return run_workflow(args.workflow, first=args.first, last=args.last, address=args.address)
    module, function = COMMANDS[args.command]
    return getattr(importlib.import_module(module), function)(args)


COMMANDS = {
    "ingest": ("jobs.ingest_command", "run_ingest_command"),
    "latents": ("jobs.latents_command", "run_latents_command"),
    "train": ("jobs.train_command", "run_train_command"),
    "evaluate": ("jobs.evaluate_command", "run_evaluate_command"),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Progress lines must show up live even when piped to `tee` or collected by `ray job logs`.
    sys.stdout.reconfigure(line_buffering=True)
    try:
        run_command(args)
    except (ValueError, FileNotFoundError) as error:
        # Bad input is the user's to fix: say what is wrong, without a traceback through our internals.
        print(f"infgen {args.command}: error: {error}", file=sys.stderr)
        return 2
    except StageError as error:
        print(f"infgen {args.command}: stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
