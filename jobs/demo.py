"""`infgen demo`: the pipeline so far in a few CPU minutes, with no network and no downloads.

0. The pipeline stages on the embedded source, as their commands run them: ingest (Ray, img2dataset over HTTP
   on 127.0.0.1, Parquet, MLflow), latents (Ray Data actors, frozen VAE) and the two small training stages
   (Ray Train + DeepSpeed). Each resumes (a no-op) when the demo is run again.
1. A frozen KL-f8 VAE: the embedded offline substitute (trained once on synthetic images, then cached).
2. A `tiny` InfGen trained with plain torch for a few hundred steps: 64² crops → 8×8 latents → decoded at
   one of several sizes up to 2× (128²), the paper's recipe scaled down from 512² → ≤1024².
3. Held-out images decoded at 2× and compared with the stock decoder + bicubic upsampling (PSNR), plus the
   same latent decoded at several sizes and aspect ratios, written as PNGs under the run directory.

Steps 1-3 become the latents and training stages of the Ray / DeepSpeed / MLflow workflow (issues 4-5).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import infgen
from infgen.embedded_vae import embedded_vae
from infgen.images import from_uint8, save_png
from infgen.metrics import psnr
from infgen.synthetic import make_image

INPUT_SIDE = 64  # encoder input: 64² → an 8×8 latent (the paper: 512² → 64×64)
TARGET_SIZES = [(64, 64), (96, 96), (128, 128), (96, 128), (128, 96)]  # bucketed, ≤ 2× like stage 1
DEFAULT_STEPS = 300
BATCH_SIZE = 4
LEARNING_RATE = 1e-3
TRAIN_IMAGES = 256  # crops encoded once up front: the frozen encoder never changes, so neither do latents
HOLDOUT_SEED = 10_000_000  # far from training seeds
SHOWCASE_SIZES = [(128, 128), (256, 256), (96, 320), (300, 75)]


def crops(seed: int, count: int, side: int) -> torch.Tensor:
    """`count` square crops of `side` px from synthetic scenes, as (count, 3, side, side) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        scene = make_image(seed + index, 256, 256)
        top, left = rng.integers(0, 256 - side + 1, size=2)
        images.append(from_uint8(scene[top : top + side, left : left + side]))
    return torch.stack(images)


INGEST_ROWS = 120


def ingest_step(run_dir: Path) -> dict:
    """The ingest stage exactly as `infgen ingest --embedded` runs it."""
    from jobs.cli import build_parser
    from jobs.ingest_command import run_ingest_command

    arguments = ["ingest", "--embedded", str(INGEST_ROWS), "--output", str(run_dir / "ingest")]
    manifest = run_ingest_command(build_parser().parse_args(arguments))
    return {"manifest": str(run_dir / "ingest" / "manifest.json"), **manifest["counts"]}


def latents_and_training_step(run_dir: Path) -> dict:
    """The latent stage and both small training stages (Ray Train + DeepSpeed), as their commands run them."""
    from jobs.cli import build_parser
    from jobs.latents_command import run_latents_command
    from jobs.train_command import run_train_command

    images, latents = str(run_dir / "ingest" / "images"), str(run_dir / "latents")
    parse = build_parser().parse_args
    latent_manifest = run_latents_command(parse(["latents", "--images", images, "--output", latents,
                                                 "--preset", "embedded"]))  # fmt: skip
    common = ["--latents", latents, "--images", images, "--storage", str(run_dir / "train")]
    first = run_train_command(parse(["train", "--preset", "stage1-small", "--name", "stage1", *common]))
    second = run_train_command(parse(["train", "--preset", "stage2-small", "--name", "stage2", *common,
                                      "--init-from", first["decoder"]]))  # fmt: skip
    return {"latent_samples": latent_manifest["counts"]["samples"], "stage1_decoder": first["decoder"],
            "stage2_decoder": second["decoder"]}  # fmt: skip


def run_demo(run_dir: str | Path = "runs/demo", steps: int | None = None) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ingest = ingest_step(run_dir)
    pipeline = latents_and_training_step(run_dir)
    steps = steps or DEFAULT_STEPS
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    vae = embedded_vae()

    # Ground truth at 128² and the encoder input: the same crop, downsampled to 64² (a 2× task).
    print(f"demo: encoding {TRAIN_IMAGES} training crops with the frozen VAE")
    targets = crops(seed=0, count=TRAIN_IMAGES, side=128)
    latents = vae.encode(F.interpolate(targets, size=INPUT_SIDE, mode="area"))  # (N, 4, 8, 8)

    model = infgen.InfGen(infgen.preset("tiny", in_distribution_scale=2.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=LEARNING_RATE / 20)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = torch.randint(0, TRAIN_IMAGES, (BATCH_SIZE,), generator=generator)
        size = TARGET_SIZES[int(torch.randint(0, len(TARGET_SIZES), (1,), generator=generator))]
        truth = F.interpolate(targets[batch], size=size, mode="area", antialias=False)
        loss = (model(latents[batch], size) - truth).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            print(f"demo: step {step}/{steps}  L1 {loss.item():.4f}  {time.perf_counter() - started:.0f} s")
    checkpoint = infgen.save(
        model, run_dir / "decoder", {"steps": steps, "task": "demo 8x8 latent -> <=128^2"}
    )

    # Held-out images: InfGen at 2× against the stock decoder + bicubic, the baseline a user has today.
    holdout = crops(seed=HOLDOUT_SEED, count=8, side=128)
    holdout_latents = vae.encode(F.interpolate(holdout, size=INPUT_SIDE, mode="area"))
    ours = infgen.decode(model, holdout_latents, (128, 128))
    baseline = F.interpolate(vae.decode(holdout_latents), size=(128, 128), mode="bicubic").clamp(-1, 1)
    report = {
        "checkpoint": str(checkpoint),
        "train_seconds": round(time.perf_counter() - started, 1),
        "psnr_infgen_2x_db": round(psnr(ours, holdout).mean().item(), 2),
        "psnr_vae_bicubic_2x_db": round(psnr(baseline, holdout).mean().item(), 2),
        "ingest": ingest,
        "pipeline": pipeline,
    }
    for index in range(3):
        row = torch.cat([holdout[index], baseline[index], ours[index]], dim=2)  # truth | baseline | InfGen
        save_png(row, run_dir / f"holdout_{index}_truth_baseline_infgen.png")
    for height, width in SHOWCASE_SIZES:
        save_png(
            infgen.decode(model, holdout_latents[:1], (height, width))[0],
            run_dir / f"any_{height}x{width}.png",
        )
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"demo: results in {run_dir.resolve()}")
    return report
