"""Decode benchmark: InfGen (one 4×64×64 latent → any output size) against a stock diffusers AutoencoderKL
decoder fed a latent of the output's size (h/8 × w/8), which is what a native high-resolution diffusion
pipeline pays. Reports median wall time, peak memory and s/Mpixel per (preset, size, decoder) and checks
InfGen's targets: log-log slope of time vs pixels ≤ 1.1 (1024² → 4096²), peak(4096²) / peak(2048²) ≤ 2.

    python bench/decode.py                    # CPU, fp32: presets tiny and base
    python bench/decode.py --device cuda      # GPU, bf16: preset paper
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built from configs; never touch the network

import torch  # noqa: E402

SIZES = [256, 512, 1024, 2048, 4096]
DECODERS = {"infgen": "InfGen (64² latent)", "stock": "AutoencoderKL (latent h/8)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--presets", nargs="+", help="default: tiny base on cpu, paper on cuda")
    parser.add_argument("--sizes", nargs="+", type=int, default=SIZES, help="square output sides")
    parser.add_argument("--decoders", nargs="+", choices=list(DECODERS), default=list(DECODERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    budget = "skip a case whose single call is estimated, from the smaller sizes, to take longer"
    parser.add_argument("--budget-seconds", type=float, default=120.0, help=budget)
    parser.add_argument("--budget-mib", type=float, help="same for peak memory; default 80%% of what is free")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    parser.add_argument("--output", help="also write the markdown report to this file")
    # The decode speed levers, to measure them against the defaults (bench/README.md, "Decode speed levers")
    parser.add_argument("--tile-cells", type=int, help="pixel-decoder tile side (default: infgen.decode's)")
    parser.add_argument("--no-channels-last", action="store_true", help="keep the conv weights NCHW")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one CPU case in a fresh process
    args = parser.parse_args(argv)
    args.presets = args.presets or (["paper"] if args.device == "cuda" else ["tiny", "base"])
    return args


def build(preset_name: str, decoder: str, size: int, device: str, levers: dict | None = None):
    """Random-init model and input for one case (timing only) → a zero-argument callable that decodes once.
    `levers`: infgen.decode's tile_cells / channels_last, where not its defaults."""
    from infgen.decode import decode
    from infgen.model import InfGen, preset

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = preset(preset_name)
    torch.manual_seed(0)
    if decoder == "infgen":
        model = InfGen(config).to(device=device, dtype=dtype)
        latents = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
        return lambda: decode(model, latents, (size, size), **(levers or {}))
    # diffusers only here: `--decoders infgen` runs where it is not installed
    from diffusers import AutoencoderKL
    from diffusers.utils import logging

    from infgen.vae import VAE_DOWNSAMPLE_FACTOR

    # The preset's pixel-decoder conv layout (for "paper" that is SD-VAE's (128, 256, 512, 512) with
    # layers_per_block 2): diffusers runs layers_per_block + 1 ResBlocks per level, plus its mid attention.
    channels = tuple(config.decoder.channels)
    groups = max(g for g in range(1, 33) if all(c % g == 0 for c in channels))  # GroupNorm: 32 where possible
    logging.set_verbosity_error()  # its warning about casting with .to(dtype) concerns pretrained weights
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=config.decoder.blocks_per_level - 1,
        latent_channels=4,
        norm_num_groups=groups,
    ).to(device=device, dtype=dtype)
    latents = torch.randn(
        1, 4, size // VAE_DOWNSAMPLE_FACTOR, size // VAE_DOWNSAMPLE_FACTOR, device=device, dtype=dtype
    )
    return torch.no_grad()(lambda: vae.decode(latents).sample)


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure(case: dict, args: argparse.Namespace) -> dict:
    """Warm-up and timed calls of one case; peak memory is the increase over the state before the calls.

    CPU: VmHWM after − VmRSS before, in a process of its own (see run_case). Writing "5" to
    /proc/self/clear_refs resets VmHWM to the current RSS, so the transient peak of building the model is not
    counted; ru_maxrss cannot be reset, so it is only a fallback (a higher construction peak hides the call).
    """
    cuda = args.device == "cuda"
    run = build(case["preset"], case["decoder"], case["size"], args.device, levers(args))
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # kernels are asynchronous: time to completion
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        peak_bytes, before = torch.cuda.max_memory_allocated, torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            peak_bytes, before = (lambda: vm_kib("VmHWM") * 1024), vm_kib("VmRSS") * 1024
        except OSError:
            peak_bytes = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731 (KiB)
            before = peak_bytes()
    # Process CPU time too (all threads): on a shared machine wall time also measures the other jobs' load.
    times, cpu_times = [], []
    try:
        for _ in range(args.warmup + args.repeats):
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            out = run()
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            del out  # the next call must not find the previous image still alive
    except RuntimeError as error:  # CUDA out of memory, or a kernel's size limit (2³¹ elements) at 4096²
        return {"error": "failed: " + str(error).strip().splitlines()[0][:80]}
    median = lambda values: statistics.median(values[args.warmup :])  # noqa: E731
    result = {"seconds": median(times), "peak_mib": (peak_bytes() - before) / 2**20}
    return result if cuda else {**result, "cpu_seconds": median(cpu_times)}  # CUDA: host time says nothing


def levers(args: argparse.Namespace) -> dict:
    chosen = {} if args.tile_cells is None else {"tile_cells": args.tile_cells}
    return chosen | ({"channels_last": False} if args.no_channels_last else {})


def run_case(case: dict, args: argparse.Namespace) -> dict:
    """CPU cases run in a fresh interpreter: the RSS high-water mark never falls and glibc keeps freed arenas,
    so in one process each case would inherit the footprint of the ones before it. CUDA's allocator counts
    and resets its peak exactly, so GPU cases share this process and its CUDA context."""
    if args.device == "cuda":
        result = measure(case, args)
        torch.cuda.empty_cache()
        return result
    argv = [sys.executable, __file__, "--child", json.dumps(case), "--threads", str(args.threads)]
    argv += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    argv += ["--tile-cells", str(args.tile_cells)] if args.tile_cells is not None else []
    argv += ["--no-channels-last"] if args.no_channels_last else []
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if proc.returncode:  # killed by SIGKILL (9): most likely the kernel's out-of-memory killer
        code = proc.returncode
        return {"error": f"failed: killed by signal {-code}" if code < 0 else f"failed: exit code {code}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extrapolate(points: list[tuple[float, float]], pixels: float) -> float:
    """Fit value = a·P + b·P² (a, b ≥ 0) through the last two measured (pixels, value) points; evaluate it.

    b is the stock decoder's mid-block attention over (h/8 · w/8)² token pairs. Where the per-pixel cost falls
    with size (fixed costs), or with one point, it is linear scaling from the largest point: an overestimate.
    """
    p2, v2 = points[-1]
    if len(points) == 1:
        return v2 * pixels / p2
    p1, v1 = points[-2]
    b = (v2 / p2 - v1 / p1) / (p2 - p1)
    a = v1 / p1 - b * p1
    if b < 0 or a < 0:
        a, b = (v2 / p2, 0.0) if b < 0 else (0.0, v2 / p2**2)
    return a * pixels + b * pixels**2


def machine(args: argparse.Namespace) -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none used"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"CPU {cpu}, {len(os.sched_getaffinity(0))} cores usable; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; GPU {gpu}; Python {platform.python_version()}; "
        f"load average (1/5/15 min) {load}"
    )


def targets(rows: list[dict], preset_name: str) -> str:
    mine = [r for r in rows if (r["preset"], r["decoder"]) == (preset_name, "infgen")]
    ok = {r["size"]: r for r in mine if "seconds" in r}
    found, top = [], max(ok, default=0)
    for key, what in ("seconds", "wall time"), ("cpu_seconds", "CPU time"):
        if 1024 in ok and top > 1024 and key in ok[top]:  # up to 4096², or the largest size measured
            slope = math.log(ok[top][key] / ok[1024][key]) / math.log((top / 1024) ** 2)
            verdict = "met" if slope <= 1.1 else f"NOT met, +{slope - 1.1:.2f}"
            found.append(f"log-log slope of {what} vs pixels 1024²→{top}² = {slope:.3f} (≤ 1.1: {verdict})")
    if 2048 in ok and 4096 in ok:
        ratio = ok[4096]["peak_mib"] / ok[2048]["peak_mib"]
        verdict = "met" if ratio <= 2 else f"NOT met, +{ratio - 2:.2f}"
        found.append(f"peak(4096²) / peak(2048²) = {ratio:.2f} (≤ 2: {verdict})")
    return f"- InfGen `{preset_name}`: " + ("; ".join(found) or "too few sizes measured to check the targets")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # explicit: torch's default need not match the cores we may use
    if args.child:
        print(json.dumps(measure(json.loads(args.child), args)))
        return
    if args.budget_mib is None:  # what is free now (the machine may be shared), less a margin
        with open("/proc/meminfo") as meminfo:
            free = next(int(line.split()[1]) * 2**10 for line in meminfo if line.startswith("MemAvailable"))
        args.budget_mib = 0.8 * (torch.cuda.mem_get_info()[0] if args.device == "cuda" else free) / 2**20
    header = f"Decode benchmark, {args.device}, {datetime.datetime.now():%Y-%m-%d %H:%M}. {machine(args)}"
    header += f"; decode options {levers(args) or 'infgen.decode defaults'}"
    print(f"torch threads: {torch.get_num_threads()}\n{header}", flush=True)
    rows = []
    for preset_name in args.presets:
        for decoder in args.decoders:
            done: list[tuple[int, dict]] = []  # (pixels, row) of the sizes measured so far
            failed = False  # an out-of-memory or crash at one size: larger ones would fail too
            for size in sorted(args.sizes):
                row = {"preset": preset_name, "size": size, "decoder": decoder}
                if failed:
                    row["error"] = "not run: a smaller size failed"
                elif done:
                    est_s = extrapolate([(p, r["seconds"]) for p, r in done], size * size)
                    est_mib = extrapolate([(p, r["peak_mib"]) for p, r in done], size * size)
                    if est_s > args.budget_seconds or est_mib > args.budget_mib:
                        row["error"] = f"skipped: est. {est_s:.0f} s / {est_mib / 1024:.1f} GB"
                if "error" not in row:
                    row.update(run_case(row, args))
                    failed = "seconds" not in row
                    done += [] if failed else [(size * size, row)]
                print(json.dumps(row), flush=True)
                rows.append(row)
    report = [header + f" (at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())})", ""]
    report += ["| preset | size | decoder | median s | peak MiB | s/Mpixel | CPU s |", "|---" * 7 + "|"]
    for r in rows:
        cells = [r["preset"], f"{r['size']}²", DECODERS[r["decoder"]], r.get("error", ""), "", "", ""]
        if "seconds" in r:
            mpixels = r["size"] ** 2 / 1e6
            cells[3:6] = [f"{r['seconds']:.3f}", f"{r['peak_mib']:.0f}", f"{r['seconds'] / mpixels:.3f}"]
            cells[6] = f"{r['cpu_seconds']:.2f}" if "cpu_seconds" in r else "–"
        report.append("| " + " | ".join(cells) + " |")
    report += ["", *(targets(rows, p) for p in args.presets)]
    print("\n" + "\n".join(report))
    if args.output:
        with open(args.output, "w") as out:
            out.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
