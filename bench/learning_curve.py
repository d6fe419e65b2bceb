"""The demo decoder's learning curve: held-out quality at 1×, 2× and 4× for each saved decoder of a run.

    .venv/bin/python bench/learning_curve.py runs/demo [--images 8]

Decodes the run's held-out images (the latent stage's hold-out, centre crops encoded at the record's input
side, as the evaluation's held-out source) with every decoder the workflow left behind: stage 1's warm start
(step 0), the EMA decoder of each kept Ray Train checkpoint of stage 1 and stage 2, and compares them with the
stock decoder + bicubic on the same latents. PSNR, and the lattice ratio: the truth-relative energy of the
decode's spectrum at the token period (8 px) and its harmonics, where InfGen's per-token artefacts sit (1.0 =
as much as the truth has there). Reports markdown. Results: bench/README.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import infgen  # noqa: E402
from bench.demo_run import held_out_of_run  # noqa: E402
from bench.report import emit, markdown_table  # noqa: E402
from pipelines.common.reconstruction import encode_crops  # noqa: E402


def decoders(run: str) -> list[tuple[str, str]]:
    """(label, folder) of every decoder the run kept, in training order."""
    found = [("stage1 step 0 (warm start)", f"{run}/stage1/warm_start_decoder")]
    for stage in ("stage1", "stage2"):
        for checkpoint in sorted(glob.glob(f"{run}/{stage}/checkpoint_*/ema_decoder")):
            with open(f"{checkpoint}/config.json") as handle:
                step = json.load(handle).get("metadata", {}).get("step", "?")
            found.append((f"{stage} step {step} (EMA)", checkpoint))
    return [(label, folder) for label, folder in found if os.path.isdir(folder)]


def psnr(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    mse = (prediction.clamp(-1, 1) - truth).square().mean(dim=(1, 2, 3))
    return float((10 * torch.log10(4.0 / mse)).mean())


def lattice_ratio(prediction: torch.Tensor, truth: torch.Tensor, period: int = 8) -> float:
    """Spectral energy at multiples of 1/period (both axes, DC excluded), decode ÷ truth."""

    def energy(images: torch.Tensor) -> float:
        spectrum = torch.fft.fft2(images.mean(1)).abs().square()  # (N, H, W), luminance-like
        height, width = spectrum.shape[-2:]
        rows = torch.arange(0, height, height // period)
        cols = torch.arange(0, width, width // period)
        lattice = spectrum[:, rows][:, :, cols]
        return float(lattice.sum() - lattice[:, 0, 0].sum())

    return energy(prediction.clamp(-1, 1)) / max(energy(truth), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a workflow run folder (runs/demo)")
    parser.add_argument("--images", type=int, default=8, help="held-out images")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    run = arguments.run.rstrip("/")
    record, vae, pictures = held_out_of_run(run, arguments.images)
    side = record.input_side
    print(f"{len(pictures)} held-out images, input {side}²; PSNR (dB) / lattice ratio\n")
    sizes = [(side * scale, side * scale) for scale in (1, 2, 4)]
    columns, rows = [f"{s[0]}² ({s[0] // side}×)" for s in sizes], {}
    for size in sizes:
        latents, truths = encode_crops(vae, pictures, size, side)
        latents = torch.from_numpy(latents)
        truth = torch.stack([torch.from_numpy(t).permute(2, 0, 1).float() / 127.5 - 1 for t in truths])
        stock = F.interpolate(vae.decode(latents), size=size, mode="bicubic", antialias=False)
        rows.setdefault("stock decoder + bicubic", []).append(
            f"{psnr(stock, truth):.2f} / {lattice_ratio(stock, truth):.2f}"
        )
        for label, folder in decoders(run):
            model = infgen.load(folder).eval()
            with torch.no_grad():
                decoded = model(latents, size)
            rows.setdefault(label, []).append(
                f"{psnr(decoded, truth):.2f} / {lattice_ratio(decoded, truth):.2f}"
            )
    emit(markdown_table(["decoder", *columns], rows), None)


if __name__ == "__main__":
    main()
