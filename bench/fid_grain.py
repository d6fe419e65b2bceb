"""How much of the demo's FID is grain: FID of the stock decode + bicubic and of InfGen, with and without
white noise added, against the truth, with the Inception the run used (the offline substitute unless real
weights are configured).

    .venv/bin/python bench/fid_grain.py runs/demo [--images 23] [--sigmas 0.01 0.02 0.04]

The demo's truths carry a fine grain (a high-pass standard deviation of ~0.01-0.02 on the [-1, 1] scale)
that the 128² input cannot keep; neither decoder draws it. If adding white noise, which carries no
information about the image, lowers a decoder's FID a lot, then FID on this data measures mostly
high-frequency energy, and a decoder could "win" on it by learning grain rather than by decoding better.
Whole 256² crops of the held-out images (grid patches: one per image at 256², four at 512²), pool features,
one noise seed. Results:
bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import infgen  # noqa: E402
from bench.demo_run import held_out_of_run  # noqa: E402
from bench.report import emit, markdown_table  # noqa: E402
from infgen.images import from_uint8, to_uint8  # noqa: E402
from infgen.metrics.distribution import extract_patches, frechet_distance, patch_boxes  # noqa: E402
from infgen.metrics.inception import load_inception  # noqa: E402
from pipelines.common.reconstruction import encode_crops  # noqa: E402

PATCH = 256


def patch_features(inception, images: np.ndarray) -> np.ndarray:
    """Pool features of the 256² grid patches of (N, H, W, 3) uint8 images."""
    patches = np.concatenate([
        extract_patches(image.transpose(2, 0, 1), patch_boxes(image.shape[0], image.shape[1], PATCH), PATCH)
        for image in images
    ])  # fmt: skip
    return inception.features(patches.transpose(0, 2, 3, 1))["pool"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a workflow run folder (runs/demo)")
    parser.add_argument("--images", type=int, default=23, help="held-out images")
    parser.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        default=[0.01, 0.02, 0.04],
        help="noise standard deviations, on the [-1, 1] scale",
    )
    parser.add_argument(
        "--inception", default=None, help="Inception weights (default: found as the evaluation finds them)"
    )
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    run = arguments.run.rstrip("/")
    record, vae, pictures = held_out_of_run(run, arguments.images)
    inception = load_inception(arguments.inception)
    model = infgen.load(f"{run}/stage2/final_decoder").eval()
    side = record.input_side
    sizes = [side * scale for scale in (2, 4) if side * scale >= PATCH]
    print(f"{len(pictures)} held-out images, input {side}²; FID of 256² grid patches against the truth\n")
    header = ["decoder", *[f"{size}² ({size // side}×)" for size in sizes]]
    rows: dict[str, list[str]] = {}
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        latents, truths = encode_crops(vae, pictures, (size, size), side)
        latents = torch.from_numpy(latents)
        truth_features = patch_features(inception, np.stack(truths))
        truth = torch.stack([from_uint8(t) for t in truths])
        high_pass = truth - F.avg_pool2d(F.pad(truth, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        rows.setdefault("truth: high-pass std", []).append(f"{float(high_pass.std()):.4f}")
        with torch.no_grad():
            stock = F.interpolate(vae.decode(latents), size=(size, size), mode="bicubic")
            decodes = {
                "stock decoder + bicubic": stock,
                "InfGen (stage 2)": model(latents, (size, size)),
            }
        for label, decoded in decodes.items():
            for sigma in [0.0, *arguments.sigmas]:
                noisy = decoded + sigma * torch.randn(decoded.shape, generator=generator)
                images = np.stack([to_uint8(image) for image in noisy])
                distance = frechet_distance(patch_features(inception, images), truth_features)
                name = label if sigma == 0 else f"{label} + noise σ {sigma}"
                rows.setdefault(name, []).append(f"{distance:.3f}")
    emit(markdown_table(header, rows), None)


if __name__ == "__main__":
    main()
