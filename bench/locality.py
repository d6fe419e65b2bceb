"""Locality prior for the mask-token queries: held-out PSNR at 2× after a CPU-demo-sized training run.

The plain-torch demo (since replaced by the workflow) trained the `tiny` preset on 8×8 latents of the
embedded frozen VAE and decoded held-out latents at 2× (128²). With the paper's query start (one learned
vector + INPE, `query_init="learned"`) every query must find its own neighbourhood of the latent through
cross-attention, and a few hundred CPU steps leave the output mostly flat colour. The default,
`query_init="latent_sample"`, adds Linear(the latent bilinearly sampled at the query's own coordinate) to the
query; this script measures what that buys on the demo's data recipe (`crops` below and its constants, 64²
encoder input → 8×8 latent → targets up to 128²), batch 4, AdamW lr 1e-3, cosine to lr/20 over the run
(optionally after a linear warm-up), seed 0.

Each variant is one run of --steps steps; the held-out PSNR is taken at each --checkpoints step of that run
(the cosine spans the whole run, so an early checkpoint sees a higher learning rate than a run of that
length would: pass --separate for one run per checkpoint, each with its own cosine, as the demo did).
Variants are `QUERY_INIT[:INIT]`, QUERY_INIT one of infgen.model.QUERY_INITS and INIT one of `xavier`,
`zero`, `small` (std 0.02) for the new Linear (default: the model's own initialisation).

    .venv/bin/python bench/locality.py --variants learned latent_sample:zero --steps 2000

Reports markdown: per variant and checkpoint, InfGen's PSNR at 2× on 8 held-out crops, the stock VAE decoder +
bicubic on the same latents, and the seconds per training step (at --threads, default 1): wall time, and the
process CPU time, which other jobs on a shared machine disturb much less. Results: bench/README.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import infgen  # noqa: E402
from bench.report import emit  # noqa: E402
from infgen.images import from_uint8, save_png  # noqa: E402
from infgen.metrics import psnr  # noqa: E402
from infgen.substitutes.embedded_vae import embedded_vae  # noqa: E402
from infgen.substitutes.synthetic import make_image  # noqa: E402

# The recipe of the plain-torch demo this benchmark was first measured on (it preceded `infgen run
# jobs/demo.yaml`): 64² crops → 8×8 latents, decoded at bucketed sizes up to 2×.
INPUT_SIDE = 64
TARGET_SIZES = [(64, 64), (96, 96), (128, 128), (96, 128), (128, 96)]
BATCH_SIZE = 4
LEARNING_RATE = 1e-3
TRAIN_IMAGES = 256
HOLDOUT_SEED = 10_000_000  # far from the training seeds


def crops(seed: int, count: int, side: int) -> torch.Tensor:
    """`count` square crops of `side` px from synthetic scenes, as (count, 3, side, side) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        scene = make_image(seed + index, 256, 256)
        top, left = rng.integers(0, 256 - side + 1, size=2)
        images.append(from_uint8(scene[top : top + side, left : left + side]))
    return torch.stack(images)


EVAL_SIZE = (128, 128)  # 2× the 64² encoder input
HOLDOUT_IMAGES = 8  # as the demo


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["learned", "latent_sample"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[300, 1000, 2000])
    parser.add_argument("--separate", action="store_true", help="one run (own cosine) per checkpoint")
    parser.add_argument("--warmup", type=int, default=0, help="linear warm-up steps before the cosine")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png-dir", help="write truth | baseline | InfGen rows for 3 held-out crops here")
    parser.add_argument("--output", help="also write the markdown report to this file")
    return parser.parse_args(argv)


def make_data(vae) -> dict:
    """The demo's data: 256 training crops (128² truth, 8×8 latents of the 64² downsample) and 8 held out."""
    targets = crops(seed=0, count=TRAIN_IMAGES, side=128)
    holdout = crops(seed=HOLDOUT_SEED, count=HOLDOUT_IMAGES, side=128)
    with torch.no_grad():
        latents = vae.encode(F.interpolate(targets, size=INPUT_SIDE, mode="area"))
        holdout_latents = vae.encode(F.interpolate(holdout, size=INPUT_SIDE, mode="area"))
        baseline = F.interpolate(vae.decode(holdout_latents), size=EVAL_SIZE, mode="bicubic").clamp(-1, 1)
    return {
        "targets": targets,
        "latents": latents,
        "holdout": holdout,
        "holdout_latents": holdout_latents,
        "baseline": baseline,
        "baseline_psnr": psnr(baseline, holdout).mean().item(),
    }


def build_model(variant: str, seed: int) -> infgen.InfGen:
    query_init, _, init = variant.partition(":")
    torch.manual_seed(seed)
    model = infgen.InfGen(infgen.preset("tiny", in_distribution_scale=2.0, query_init=query_init))
    if init:
        if model.query_in is None:
            raise ValueError(f"variant {variant!r}: query_init 'learned' has no Linear to initialise")
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            weight = model.query_in.weight
            if init == "zero":
                weight.zero_()
            elif init == "small":
                weight.normal_(0.0, 0.02, generator=generator)
            elif init == "xavier":
                bound = math.sqrt(6.0 / (weight.shape[0] + weight.shape[1]))
                weight.uniform_(-bound, bound, generator=generator)
            else:
                raise ValueError(f"unknown init {init!r} in variant {variant!r}")
            model.query_in.bias.zero_()
    return model


def learning_rate_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then the demo's cosine from 1 to 1/20 (CosineAnnealingLR's closed form)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 1 / 20 + (1 - 1 / 20) * (1 + math.cos(math.pi * progress)) / 2


def evaluate(model: infgen.InfGen, data: dict) -> tuple[float, torch.Tensor]:
    model.eval()
    ours = infgen.decode(model, data["holdout_latents"], EVAL_SIZE)
    model.train()
    return psnr(ours, data["holdout"]).mean().item(), ours


def train(variant: str, steps: int, checkpoints: list[int], data: dict, args) -> list[dict]:
    """One run; returns one row per checkpoint (≤ steps) with PSNR and the mean s/step so far."""
    model = build_model(variant, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, steps, args.warmup)
    )
    generator = torch.Generator().manual_seed(args.seed)
    rows, train_seconds, cpu_seconds = [], 0.0, 0.0
    for step in range(1, steps + 1):
        started, cpu_started = time.perf_counter(), time.process_time()
        batch = torch.randint(0, TRAIN_IMAGES, (BATCH_SIZE,), generator=generator)
        size = TARGET_SIZES[int(torch.randint(0, len(TARGET_SIZES), (1,), generator=generator))]
        truth = F.interpolate(data["targets"][batch], size=size, mode="area", antialias=False)
        loss = (model(data["latents"][batch], size) - truth).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        train_seconds += time.perf_counter() - started
        cpu_seconds += time.process_time() - cpu_started
        if step in checkpoints:
            value, ours = evaluate(model, data)
            rows.append(
                {
                    "variant": variant,
                    "run_steps": steps,
                    "step": step,
                    "psnr": value,
                    "loss": loss.item(),
                    "s_per_step": train_seconds / step,
                    "cpu_s_per_step": cpu_seconds / step,
                }
            )
            print(
                f"locality: {variant} step {step}/{steps}  L1 {loss.item():.4f}  PSNR {value:.2f} dB  "
                f"{train_seconds / step:.3f} s/step ({cpu_seconds / step:.3f} CPU s)",
                flush=True,
            )
            if args.png_dir:
                directory = Path(args.png_dir)
                directory.mkdir(parents=True, exist_ok=True)
                for index in range(3):
                    row = torch.cat([data["holdout"][index], data["baseline"][index], ours[index]], dim=2)
                    name = f"{variant.replace(':', '-')}_run{steps}_step{step}_{index}.png"
                    save_png(row, directory / name)
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = make_data(embedded_vae())
    checkpoints = sorted(set(args.checkpoints) | ({args.steps} if not args.separate else set()))
    results = []
    for variant in args.variants:
        if args.separate:
            for steps in checkpoints:
                results += train(variant, steps, [steps], data, args)
        else:
            results += train(variant, args.steps, checkpoints, data, args)
    mode = "one run per checkpoint" if args.separate else f"one run of {args.steps} steps"
    lines = [
        f"## Query locality prior: tiny preset, held-out PSNR at 2× ({EVAL_SIZE[0]}²), {mode}",
        "",
        f"batch {BATCH_SIZE}, AdamW lr {args.lr:g}, warm-up {args.warmup}, cosine to lr/20, "
        f"seed {args.seed}, "
        f"{args.threads} thread(s); {HOLDOUT_IMAGES} held-out crops",
        "",
        "| variant | step | InfGen dB | VAE + bicubic dB | gap dB | s/step | CPU s/step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results:
        lines.append(
            f"| {row['variant']} | {row['step']} | {row['psnr']:.2f} | {data['baseline_psnr']:.2f} | "
            f"{row['psnr'] - data['baseline_psnr']:+.2f} | {row['s_per_step']:.3f} | "
            f"{row['cpu_s_per_step']:.3f} |"
        )
    emit(lines, args.output)
    return results


if __name__ == "__main__":
    main()
