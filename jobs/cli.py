"""The `infgen` command.

    infgen decode --checkpoint CKPT --latents FILE.npy --size 2160x3840 --out out.png [--vae VAE_DIR]
    infgen demo [--run-dir runs/demo]
    infgen ingest (--metadata META... | --embedded ROWS | --regenerate MANIFEST) --output OUT
    infgen latents --images OUT/images --output LATENTS [--preset stage1|stage2|embedded] [--vae DIR]
    infgen train --preset stage1|stage2|stage1-small|stage2-small --latents L --images I [--init-from D]

Subcommands import their heavy dependencies only when they run, so `infgen --help` is instant.
"""

from __future__ import annotations

import argparse
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

    demo = commands.add_parser("demo", help="train a tiny decoder on the embedded data and decode with it")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")

    from jobs.ingest_command import add_arguments as add_ingest_arguments

    ingest = commands.add_parser("ingest", help="metadata → verified >2 MP images in Parquet shards (Ray)")
    add_ingest_arguments(ingest)

    from jobs.latents_command import add_arguments as add_latents_arguments

    latents = commands.add_parser("latents", help="image shards → frozen-VAE latent shards (Ray Data)")
    add_latents_arguments(latents)

    from jobs.train_command import add_arguments as add_train_arguments

    train = commands.add_parser("train", help="one decoder training stage (Ray Train + DeepSpeed)")
    add_train_arguments(train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Progress lines must show up live even when piped to `tee` or collected by `ray job logs`.
    sys.stdout.reconfigure(line_buffering=True)
    try:
        if args.command == "decode":
            from jobs.decode_command import run_decode

            run_decode(args)
        elif args.command == "demo":
            from jobs.demo import run_demo

            run_demo(run_dir=args.run_dir, steps=args.steps)
        elif args.command == "ingest":
            from jobs.ingest_command import run_ingest_command

            run_ingest_command(args)
        elif args.command == "latents":
            from jobs.latents_command import run_latents_command

            run_latents_command(args)
        elif args.command == "train":
            from jobs.train_command import run_train_command

            run_train_command(args)
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
