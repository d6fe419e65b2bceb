"""Training step benchmark.

CPU mode (default): the step time of our Ray Train + DeepSpeed loop (pipelines/training/loop.py, one worker)
against a plain single-process torch loop doing the same work (same model, loss with GAN, batch from the
same LatentBatches, AdamW, clipping, discriminator step, EMA), measured in the same run. Target: overhead
≤ 15 %. It builds its own small embedded ingest and latents first (about a minute).

GPU mode (`--device cuda`): the plain loop for the `paper` preset at 1024² on random latents and targets,
bf16 autocast, reporting samples/s and model FLOPs utilisation (FLOPs counted by torch's FlopCounterMode,
against the card's dense bf16 peak).

    infra/isolated.sh .venv/bin/python bench/train.py [--steps 30]
    python bench/train.py --device cuda [--batch 4]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.report import emit  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per card


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="samples per step")
    parser.add_argument("--output", help="also write the markdown report to this file")
    return parser.parse_args(argv)


def build(config, device: str):
    import infgen
    from infgen.discriminator import DiscriminatorConfig
    from infgen.losses import DecoderLoss, LossConfig
    from pipelines.training.loop import parameter_groups

    torch.manual_seed(config.seed)
    model = infgen.InfGen(infgen.preset(config.model_preset, **config.model_overrides)).to(device)
    loss = DecoderLoss(
        LossConfig(
            perceptual_crop=config.loss_crop,
            gan_start_step=config.gan_start_step,
            discriminator=DiscriminatorConfig(base_channels=config.discriminator_channels, norm_groups=16),
        )
    ).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.99))
    d_optimizer = torch.optim.AdamW(
        loss.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0
    )
    ema = copy.deepcopy(model).requires_grad_(False)
    return model, loss, optimizer, d_optimizer, ema


def plain_step(parts, latents, truth, step: int, autocast: bool) -> None:
    model, loss, optimizer, d_optimizer, ema = parts
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=autocast):
        prediction = model(latents, tuple(truth.shape[-2:]))
        losses = loss.generator_loss(prediction.float(), truth, step)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if loss.gan_active(step):
        with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=autocast):
            d_loss = loss.discriminator_loss(prediction.float(), truth, step)["discriminator"]
        d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(loss.discriminator.parameters(), 1.0)
        d_optimizer.step()
    with torch.no_grad():
        for average, current in zip(ema.parameters(), model.parameters()):
            average.lerp_(current, 0.001)


def cpu_mode(args) -> list[str]:
    import json

    import ray

    from jobs.cli import build_parser
    from jobs.ingest_command import run_ingest_command
    from jobs.latents_command import run_latents_command
    from jobs.ray_session import connect_ray
    from pipelines.training.config import STAGE1_SMALL
    from pipelines.training.data import LatentBatches
    from pipelines.training.stage import run_training

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    connect_ray()
    total = args.warmup + args.steps
    config = dataclasses.replace(
        STAGE1_SMALL, steps=total, num_workers=1, global_batch=args.batch, gan_start_step=0,
        checkpoint_every=10**9, log_every=10**9,
    )  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    parse = build_parser().parse_args
    tracking = f"sqlite:///{scratch / 'mlflow.db'}"
    run_ingest_command(parse(["ingest", "--embedded", "60", "--output", str(scratch / "ingest"),
                              "--samples-per-shard", "20", "--tracking-uri", tracking]))  # fmt: skip
    images, latents = str(scratch / "ingest" / "images"), str(scratch / "latents")
    run_latents_command(parse(["latents", "--images", images, "--output", latents, "--preset", "embedded",
                               "--tracking-uri", tracking]))  # fmt: skip

    # Plain loop first (Ray idle but started, as in the other run), the same threads as one Ray worker.
    threads = 1
    torch.set_num_threads(threads)
    data = LatentBatches(latents, images, args.batch, config.seed)
    parts = build(config, "cpu")
    plain = []
    for step in range(total):
        started = time.perf_counter()
        batch_latents, truth = data.batch(step, 0, 1)
        plain_step(parts, batch_latents, truth, step, autocast=False)
        plain.append(time.perf_counter() - started)

    run_training(config, latents, images, str(scratch / "train"), "bench", tracking)
    log = [
        json.loads(line) for line in (scratch / "train" / "bench" / "losses.jsonl").read_text().splitlines()
    ]
    ours = [record["step_seconds"] for record in log]
    plain_median = statistics.median(plain[args.warmup :])
    ours_median = statistics.median(ours[args.warmup :])
    overhead = ours_median / plain_median - 1
    ray.shutdown()
    return [
        f"Training step, CPU, {args.batch} samples/step, preset `{config.model_preset}` "
        "(targets ≤ 128², GAN on), "
        f"1 worker / {threads} torch thread, median of {args.steps} steps after {args.warmup} warm-up, "
        f"load {os.getloadavg()[0]:.1f}",
        "",
        "| loop | median s/step | samples/s |",
        "|---|---|---|",
        f"| plain torch, one process | {plain_median:.4f} | {args.batch / plain_median:.1f} |",
        f"| Ray Train + DeepSpeed (ours) | {ours_median:.4f} | {args.batch / ours_median:.1f} |",
        "",
        f"overhead = {100 * overhead:+.1f} % (target ≤ 15 %: {'met' if overhead <= 0.15 else 'MISSED'})",
    ]


def gpu_measure(args, checkpointing: bool) -> tuple[float, float, float]:
    """(median s/step, FLOPs/step, peak GiB) of the plain loop for `paper` at 1024² on the GPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.training.config import STAGE1

    device = "cuda"
    config = dataclasses.replace(STAGE1, gan_start_step=0)
    parts = build(config, device)
    parts[0].set_activation_checkpointing(checkpointing)
    latents = torch.randn(args.batch, 4, 64, 64, device=device)
    truth = torch.rand(args.batch, 3, 1024, 1024, device=device) * 2 - 1
    plain_step(parts, latents, truth, 0, autocast=True)  # warm-up outside the counters
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        plain_step(parts, latents, truth, step, autocast=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    memory = torch.cuda.max_memory_allocated() / 2**30
    with FlopCounterMode(display=False) as counter:  # model FLOPs: recomputation is not counted as useful
        parts[0].set_activation_checkpointing(False)
        plain_step(parts, latents, truth, 0, autocast=True)
    del parts
    torch.cuda.empty_cache()
    return statistics.median(times[args.warmup :]), counter.get_total_flops(), memory


def gpu_mode(args) -> list[str]:
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    lines = [
        f"Training step, {name}, preset `paper` (252.7M), 4×64×64 → 1024², batch {args.batch}, "
        f"bf16 autocast, GAN + LPIPS on 512² crops, torch {torch.__version__}",
        "",
        "| activation checkpointing | median s/step | samples/s | model TFLOP/step | MFU | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for checkpointing in (False, True):
        seconds, flops, memory = gpu_measure(args, checkpointing)
        mfu = flops / seconds / (peak * 1e12) if peak else float("nan")
        lines.append(
            f"| {'on' if checkpointing else 'off'} | {seconds:.3f} | {args.batch / seconds:.2f} | "
            f"{flops / 1e12:.2f} | {100 * mfu:.1f} % | {memory:.1f} |"
        )
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    lines = gpu_mode(args) if args.device == "cuda" else cpu_mode(args)
    emit(lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
