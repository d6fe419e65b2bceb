"""Held-out images → (encoder input, ground truth at a target size) → latents: what the evaluation's
reconstruction source scores and what training's validation grid decodes, computed one way for both.

The crop is the largest centred one with the target's aspect ratio; like the training crops
(pipelines/common/crops.py) it is squashed to input_side² for the encoder and resized to the target for the
ground truth, so the decoder is asked exactly the task it was trained on.
"""

from __future__ import annotations

from collections import defaultdict

import fsspec
import numpy as np
import pyarrow.parquet as pq

from pipelines.common.crops import centred_sample, crop_pair, decode_rgb


def read_images(refs: list[dict]) -> list:
    """Pillow images for [{"shard", "row"}], reading only the row groups that hold them."""
    wanted: dict[str, list[int]] = defaultdict(list)
    for ref in refs:
        wanted[ref["shard"]].append(ref["row"])
    found: dict[tuple[str, int], object] = {}
    for shard, rows in wanted.items():
        with fsspec.open(shard, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows
                                      for g in range(parquet.num_row_groups)])  # fmt: skip
            for group in sorted({int(np.searchsorted(starts, row, side="right") - 1) for row in rows}):
                data = parquet.read_row_group(group, columns=["image"]).column("image").to_pylist()
                for offset, payload in enumerate(data):
                    row = int(starts[group]) + offset
                    if row in rows:
                        found[(shard, row)] = decode_rgb(payload)
    return [found[(ref["shard"], ref["row"])] for ref in refs]


def crop_pairs(images: list, size: tuple[int, int], input_side: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(encoder inputs (N, input_side, input_side, 3) uint8, [ground truth H×W×3 uint8])."""
    inputs, truths = [], []
    for image in images:
        encoder_input, truth = crop_pair(image, centred_sample(image.height, image.width, size), input_side)
        inputs.append(encoder_input)
        truths.append(truth)
    return np.stack(inputs), truths


def encode_crops(vae, images: list, size: tuple[int, int], input_side: int) -> tuple[np.ndarray, list]:
    """(scaled latents (N, C, h, w) float32, [ground truth H×W×3 uint8]) of `crop_pairs`: the posterior mean,
    so the same image always gives the same latent."""
    import torch

    from infgen.images import from_uint8

    inputs, truths = crop_pairs(images, size, input_side)
    pixels = torch.stack([from_uint8(image) for image in inputs])  # the VAE moves them to its device
    with torch.inference_mode():
        mean, _ = vae.encode_posterior(pixels)
    return mean.float().cpu().numpy(), truths
