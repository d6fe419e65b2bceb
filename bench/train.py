"""Training step benchmark.

CPU mode (default): the step time of our Ray Train + DeepSpeed loop (pipelines/training/loop.py, one worker)
against a plain single-process torch loop doing the same work (same model, loss with GAN, batch from the
same LatentBatches, AdamW, clipping, discriminator step, EMA), measured in the same run. Target: overhead
≤ 15 %. It builds its own small embedded ingest and latents first (about a minute).

In-process mode (`--device cuda`, or `--engines` on either device): one process, no Ray, random latents and
targets, the `paper` preset at 1024² by default. `--engines plain` (the default on cuda) is the plain loop
with bf16 autocast; `--engines deepspeed` is our loop's own code (`build_engines` and `train_step` of
pipelines/training/loop.py: two DeepSpeed engines from the typed config's JSON, bf16, ZeRO stage, clipping,
torch AdamW, EMA, the finite-loss all-reduce) on a one-rank process group (nccl on cuda, gloo on cpu, as Ray
Train would set up); `both` measures the two in the same process, so DeepSpeed's overhead on the device is
their ratio. Reports samples/s and model FLOPs utilisation (FLOPs of the plain step counted by torch's
FlopCounterMode, without recomputation, against the card's dense bf16 peak).

Data-path mode (`--data-path`, CPU, no Ray): training's data path alone (pipelines/training/data.py's
LatentBatches: shard read, ground-truth decode and resize, batch assembly) against the step alone (the plain
loop above on the same batches, one torch thread as a Ray worker has), in one run on the same machine, at the
stage-1 and stage-2 geometries of the small presets, from photo-like JPEGs of the sizes each stage ingests
(2.5 MP, 12 MP); then the data path alone at the full stages' geometries (512² inputs, targets to 1024 and
2048), to hold against a GPU step. Each data path is measured as it was (one thread, full decode, no
prefetch) and as it is (prefetch, decode threads, reduced JPEG decode). Target: data path ≥ 2× the step.

    infra/isolated.sh .venv/bin/python bench/train.py [--steps 30]
    infra/isolated.sh .venv/bin/python bench/train.py --data-path [--steps 12]
    python bench/train.py --device cuda [--batch 4]                         # plain, checkpointing off and on
    python bench/train.py --device cuda --engines both --checkpointing on   # DeepSpeed against plain
    python bench/train.py --device cpu --engines both --model-preset tiny --latent 8 --target 64 --steps 2
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
import traceback
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
    parser.add_argument("--data-path", action="store_true", help="the data path alone against the step alone")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="samples per step")
    parser.add_argument("--output", help="also write the markdown report to this file")
    in_process = "in-process mode (default on cuda: plain); on cpu, giving it picks in-process over Ray"
    parser.add_argument("--engines", choices=["plain", "deepspeed", "both"], help=in_process)
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                        help="in-process mode: activation checkpointing settings to measure")  # fmt: skip
    parser.add_argument("--model-preset", default="paper", help="in-process mode (tiny: a CPU smoke test)")
    parser.add_argument("--latent", type=int, default=64, help="in-process mode: latent side")
    parser.add_argument("--target", type=int, default=1024, help="in-process mode: target side")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="in-process mode")
    parser.add_argument("--dist-backend", choices=["nccl", "gloo"], help="in-process DeepSpeed: default "
                        "nccl on cuda (as Ray Train's TorchConfig), gloo on cpu")  # fmt: skip
    return parser.parse_args(argv)


def build(config, device: str):
    import infgen
    from infgen.losses import DecoderLoss
    from pipelines.training.loop import parameter_groups

    torch.manual_seed(config.seed)
    model = infgen.InfGen(infgen.preset(config.model_preset, **config.model_overrides)).to(device)
    loss = DecoderLoss(config.loss).to(device)
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

    from jobs.cli import run_arguments
    from jobs.ray_session import connect_ray
    from pipelines.common.tracking import StageTracking
    from pipelines.training.config import STAGE1_SMALL
    from pipelines.training.data import LatentBatches
    from pipelines.training.stage import run_training

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    connect_ray()
    total = args.warmup + args.steps
    config = dataclasses.replace(
        STAGE1_SMALL.with_steps(total, gan_start_step=0), num_workers=1, global_batch=args.batch,
        checkpoint_every=10**9, log_every=10**9,
    )  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    tracking = f"sqlite:///{scratch / 'mlflow.db'}"
    run_arguments(["ingest", "--embedded", "60", "--output", str(scratch / "ingest"),
                   "--samples-per-shard", "20", "--tracking-uri", tracking])  # fmt: skip
    images, latents = str(scratch / "ingest" / "images"), str(scratch / "latents")
    run_arguments(["latents", "--images", images, "--output", latents, "--preset", "embedded",
                   "--tracking-uri", tracking])  # fmt: skip

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

    run_training(config, latents, images, str(scratch / "train" / "bench"), StageTracking(tracking))
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


def in_process_config(args, checkpointing: bool):
    """The stage-1 config (for `tiny`: the small one) at this benchmark's batch, one rank, GAN from step 0."""
    from pipelines.training.config import STAGE1, STAGE1_SMALL

    base = STAGE1_SMALL if args.model_preset == STAGE1_SMALL.model_preset else STAGE1
    return dataclasses.replace(
        base, model_preset=args.model_preset, global_batch=args.batch, num_workers=1,
        precision=args.precision, zero_stage=STAGE1.zero_stage, activation_checkpointing=checkpointing,
        use_gpu=args.device == "cuda",
    ).with_gan_start(0)  # fmt: skip


def random_batch(args) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, 4, args.latent, args.latent, generator=generator)
    truth = torch.rand(args.batch, 3, args.target, args.target, generator=generator) * 2 - 1
    return latents.to(args.device), truth.to(args.device)  # on the device for both loops: no copy timed


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def _timed(args, step_fn) -> list[float]:
    times = []
    for step in range(args.warmup + args.steps):
        _sync(args.device)
        started = time.perf_counter()
        step_fn(step)
        _sync(args.device)
        times.append(time.perf_counter() - started)
    return times


def plain_measure(args, config) -> tuple[float, float, float]:
    """(median s/step, FLOPs/step, peak GiB) of the plain loop."""
    from torch.utils.flop_counter import FlopCounterMode

    device, autocast = args.device, config.precision == "bf16"
    parts = build(config, device)
    parts[0].set_activation_checkpointing(config.activation_checkpointing)
    latents, truth = random_batch(args)
    plain_step(parts, latents, truth, 0, autocast=autocast)  # warm-up outside the counters
    _reset_peak(device)
    times = _timed(args, lambda step: plain_step(parts, latents, truth, step, autocast=autocast))
    memory = _peak_gib(device)
    # Model FLOPs: recomputation is not counted as useful. Counted on one sample and scaled (every term is
    # per sample), so that the step without checkpointing fits where the timed one needed it (80 GB cards).
    with FlopCounterMode(display=False) as counter:
        parts[0].set_activation_checkpointing(False)
        plain_step(parts, latents[:1], truth[:1], 0, autocast=autocast)
    parts = None  # free before the next measurement (the lambda above holds the name, not a copy)
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times[args.warmup :]), counter.get_total_flops() * args.batch, memory


def init_one_rank_process_group(device: str, backend: str | None = None) -> str:
    """A one-rank torch process group as Ray Train's TorchConfig makes it (nccl with GPUs, gloo on CPU), from
    the usual env variables, so DeepSpeed reuses it (no MPI discovery); returns the backend."""
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as probe:  # a free port for the rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        for key, value in dict(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        ).items():
            os.environ.setdefault(key, value)
        if device == "cuda":
            torch.cuda.set_device(0)
        backend = backend or ("nccl" if device == "cuda" else "gloo")
        dist.init_process_group(backend=backend, init_method="env://")
    return dist.get_backend()


def deepspeed_measure(args, config) -> tuple[float, float]:
    """(median s/step, peak GiB) of our loop's step: pipelines/training/loop.py's engines and train_step."""
    import gc

    from pipelines.training.loop import build_engines, train_step

    device = args.device
    init_one_rank_process_group(device, args.dist_backend)  # once per process
    parts = build_engines(config)
    latents, truth = random_batch(args)

    def step_fn(step: int) -> None:
        if train_step(parts, config, latents, truth, step, rank=0) is None:
            raise FloatingPointError(f"non-finite loss at step {step}")

    step_fn(0)  # warm-up outside the peak
    _reset_peak(device)
    times = _timed(args, step_fn)
    memory = _peak_gib(device)
    for engine in (parts.generator, parts.discriminator):
        if hasattr(engine, "destroy"):
            engine.destroy()
    parts = engine = None  # free before the next measurement
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times[args.warmup :]), memory


def in_process_mode(args) -> list[str]:
    import infgen

    device, engines = args.device, args.engines or "plain"
    os.environ.setdefault("DS_ACCELERATOR", device)  # no probing: the device we were told
    if device == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (1 torch thread)"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    settings = {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]
    config = in_process_config(args, settings[0])
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = infgen.InfGen(infgen.preset(config.model_preset, **config.model_overrides))
    parameters = sum(p.numel() for p in model.parameters())
    versions = f"torch {torch.__version__}"
    if engines != "plain":
        import deepspeed

        backend = args.dist_backend or ("nccl" if device == "cuda" else "gloo")
        versions += f", deepspeed {deepspeed.__version__} ({backend}, 1 rank)"
    lines = [
        f"Training step, {name}, preset `{config.model_preset}` ({parameters / 1e6:.1f}M), "
        f"4×{args.latent}² → {args.target}², batch {args.batch}, "
        f"GAN + LPIPS on {config.loss.perceptual_crop}² crops, "
        f"median of {args.steps} steps after {args.warmup} warm-up, {versions}",
        "",
        "plain: fp32 weights, bf16 autocast, torch AdamW, clipping, EMA; DeepSpeed: loop.py's "
        f"`build_engines` + `train_step` ({config.precision} weights, ZeRO {config.zero_stage}, torch AdamW, "
        f"clipping {config.optimizer.gradient_clipping}, EMA, finite-loss all-reduce; its LPIPS runs in fp32)"
        if config.precision == "bf16"
        else "fp32 throughout",
        "",
        "| loop | activation checkpointing | median s/step | samples/s | model TFLOP/step | MFU | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    notes, failures = [], []
    for checkpointing in settings:
        config = in_process_config(args, checkpointing)
        flops, measured = None, {}
        if engines in ("plain", "both"):
            seconds, flops, memory = plain_measure(args, config)
            measured["plain torch"] = (seconds, memory)
        if engines in ("deepspeed", "both"):
            try:
                measured["DeepSpeed (loop.py)"] = deepspeed_measure(args, config)
            except Exception as error:  # report it beside the plain numbers rather than lose those
                traceback.print_exc()
                first = (str(error).strip().splitlines() or [""])[0][:160]
                failures.append(f"| DeepSpeed (loop.py) | {'on' if checkpointing else 'off'} | FAILED: "
                                f"{type(error).__name__}: {first} | | | | |")  # fmt: skip
        for loop, (seconds, memory) in measured.items():
            tflop = f"{flops / 1e12:.2f}" if flops else "–"
            mfu = f"{100 * flops / seconds / (peak * 1e12):.1f} %" if flops and peak else "–"
            on = "on" if checkpointing else "off"
            speed = f"{seconds:.3f} | {args.batch / seconds:.2f}"
            peak_gib = "–" if memory != memory else f"{memory:.1f}"  # NaN: not measured on CPU
            lines.append(f"| {loop} | {on} | {speed} | {tflop} | {mfu} | {peak_gib} |")
        if len(measured) == 2:
            (plain_s, _), (ours_s, _) = measured.values()
            verdict = "met" if ours_s <= 1.15 * plain_s else "MISSED"
            notes.append(
                f"DeepSpeed overhead, checkpointing {'on' if checkpointing else 'off'}: "
                f"{100 * (ours_s / plain_s - 1):+.1f} % (target ≤ 15 %: {verdict})"
            )
    args.failed = bool(failures)
    return lines + failures + ([""] + notes if notes else [])


def _photo_jpeg(seed: int, width: int, height: int) -> bytes:
    """A photo-like JPEG (a synthetic scene upscaled, plus grain, so it is not cheaper to decode than a
    photograph of its size)."""
    import io

    import numpy as np
    from PIL import Image

    from infgen.substitutes.synthetic import make_image

    scene = Image.fromarray(make_image(seed, height // 4, width // 4)).resize((width, height), Image.BICUBIC)
    grain = np.random.default_rng(seed).integers(-6, 7, (height, width, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(scene, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _tiny_vae(directory: Path) -> str:
    """A tiny randomly initialised KL-f8 VAE (the test suite's): the data path does not depend on what the
    latents hold, and encoding the sources with it is quick."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  block_out_channels=[8] * 4, norm_num_groups=4, layers_per_block=1,
                  latent_channels=4).save_pretrained(directory)  # fmt: skip
    return str(directory)


def _shards(scratch: Path, name: str, size: tuple[int, int], count: int, latent_config, vae) -> tuple:
    """(latents dir, images dir): one images shard of `count` sources of `size` and its latent shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.latents.encode import encode_shard

    images, latents = scratch / name / "images", scratch / name / "latents"
    images.mkdir(parents=True)
    latents.mkdir()
    width, height = size
    keys = [f"{index:06d}" for index in range(count)]
    table = pa.table({"key": keys, "image": pa.array([_photo_jpeg(i, width, height) for i in range(count)]),
                      "width": pa.array([width] * count, pa.int32()),
                      "height": pa.array([height] * count, pa.int32())})  # fmt: skip
    pq.write_table(table, images / "00000.parquet", row_group_size=16)
    encode_shard(str(images / "00000.parquet"), str(latents), vae[0], vae[1], latent_config)
    return str(latents), str(images)


def _data_rate(shards: tuple, batch: int, seed: int, max_side, batches: int, **options) -> float:
    """Samples/s of LatentBatches alone, over `batches` batches after one (the shard read, the threads)."""
    from pipelines.training.data import LatentBatches

    data = LatentBatches(*shards, batch, seed, max_target_side=max_side, **options)
    try:
        data.batch(0, 0, 1)
        started = time.perf_counter()
        for index in range(1, batches + 1):
            data.batch(index, 0, 1)
        return batches * batch / (time.perf_counter() - started)
    finally:
        data.close()


OLD_PATH = {"prefetch": 0, "decode_threads": 1, "reduced_decode": False}  # what the step waited for before


def data_path_mode(args) -> list[str]:
    from pipelines.common.crops import CropPolicy
    from pipelines.common.vae_source import load_frozen_vae
    from pipelines.latents.config import SMOKE, STAGE1, STAGE2
    from pipelines.training.config import STAGE1_SMALL, STAGE2_SMALL
    from pipelines.training.data import LatentBatches

    torch.set_num_threads(1)  # a Ray worker's torch threads (threads_per_worker 1)
    scratch = Path(tempfile.mkdtemp(prefix="bench-data-"))
    vae = load_frozen_vae(_tiny_vae(scratch / "vae"), "cpu")
    stage1_source, stage2_source = (1920, 1300), (4000, 3000)  # 2.5 MP and 12 MP, as each stage ingests
    coarse = {"step": 256}  # fewer buckets, so a few dozen images fill whole batches
    small_latents = dataclasses.replace(SMOKE, holdout_fraction=0)
    rows, lines = [], []
    for name, config, source in [("stage-1 small", STAGE1_SMALL.with_gan_start(0), stage1_source),
                                 ("stage-2 small", STAGE2_SMALL, stage2_source)]:  # fmt: skip
        shards = _shards(scratch, name, source, 12, small_latents, vae)
        old = _data_rate(shards, config.global_batch, config.seed, config.max_target_side, args.steps,
                         **OLD_PATH)  # fmt: skip
        new = _data_rate(shards, config.global_batch, config.seed, config.max_target_side, args.steps)
        data = LatentBatches(*shards, config.global_batch, config.seed,
                             max_target_side=config.max_target_side, prefetch=0)  # fmt: skip
        batches = [data.batch(index, 0, 1) for index in range(args.warmup + args.steps)]
        data.close()
        parts = build(config, "cpu")
        times = []
        for step, (latents, truth) in enumerate(batches):
            started = time.perf_counter()
            plain_step(parts, latents, truth, step, autocast=False)
            times.append(time.perf_counter() - started)
        step_rate = config.global_batch / statistics.median(times[args.warmup :])
        verdict = "met" if new >= 2 * step_rate else "MISSED"
        rows.append(f"| {name} ({source[0]}×{source[1]} sources, batch {config.global_batch}) | "
                    f"{step_rate:.1f} | {old:.1f} ({old / step_rate:.1f}×) | "
                    f"{new:.1f} ({new / step_rate:.1f}×, {verdict}) |")  # fmt: skip
    lines += [
        "Data path alone against the step alone, CPU, small presets (tiny model, 8×8 latents, "
        f"targets ≤ 128², GAN on), 1 torch thread, {args.steps} batches each, load {os.getloadavg()[0]:.1f}",
        "",
        "| geometry | step samples/s | data path before (×step) | data path now (×step; target ≥ 2×) |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    full, full_batches = [], max(2, args.steps // 6)  # a full 12 MP decode took 0.85 s: keep it short
    for name, latent_config, source in [("stage 1 (targets 512–1024)", STAGE1, stage1_source),
                                        ("stage 2 (targets 512–2048)", STAGE2, stage2_source)]:  # fmt: skip
        latent_config = dataclasses.replace(
            latent_config,
            holdout_fraction=0,
            batch_size=8,
            policy=CropPolicy(max_side=latent_config.policy.max_side, **coarse),
        )
        shards = _shards(scratch, name.split(" (")[0], source, 12, latent_config, vae)
        old = _data_rate(shards, 4, 0, None, full_batches, **OLD_PATH)
        new = _data_rate(shards, 4, 0, None, full_batches)
        full.append(f"| {name}, {source[0]}×{source[1]} sources | {old:.2f} | {new:.2f} |")
    lines += [
        f"Data path alone at the full stages' geometry (512² inputs), CPU, batches of 4, {full_batches} "
        "batches each; 2 decode threads now. A GPU step of 0.9–2 s for 4 samples consumes 2–4.4 samples/s.",
        "",
        "| geometry | before: samples/s | now: samples/s |",
        "|---|---|---|",
        *full,
    ]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data_path:
        emit(data_path_mode(args), args.output)
        return 0
    lines = in_process_mode(args) if args.device == "cuda" or args.engines else cpu_mode(args)
    emit(lines, args.output)
    return 1 if getattr(args, "failed", False) else 0


if __name__ == "__main__":
    sys.exit(main())
