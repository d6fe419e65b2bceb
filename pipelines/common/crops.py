"""Crop geometry shared by the stages: the training crop policy (docs/paper.md, "Training"), the centred crops
of evaluation and validation, and the pixel operations that cut and resize them.

The policy: what each training sample cuts out of a high-resolution image.

A sample is a crop of the source with the aspect ratio of a target-size bucket, at least as large as the
target on both sides (the ground truth is never upscaled). The same crop is resized to the target size (the
ground truth) and squashed to `input_side`² (the encoder input), which teaches the decoder to recover the
aspect ratio from a square latent. About `anchor_share` of samples are the square anchors input→input and
input→2·input, the main use cases. Everything is drawn from a generator seeded by (seed, image key, sample
index), so a sample is the same whichever worker makes it and in whatever order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.common.image_policy import decode_rgb  # noqa: F401  (the policy's decode, re-exported)


@dataclass(frozen=True)
class CropPolicy:
    input_side: int = 512  # encoder input: 512² → 4×64×64 latents
    min_side: int = 512  # target sides: multiples of `step` in [min_side, max_side]
    max_side: int = 1024  # stage 1; stage 2 goes to 2048
    step: int = 64
    max_aspect_ratio: float = 2.0  # target width/height within [1/r, r]
    anchor_share: float = 0.25

    def __post_init__(self):
        if not 0 < self.min_side <= self.max_side or self.step <= 0 or self.max_aspect_ratio < 1:
            raise ValueError(f"crop policy {self} has no valid target sizes")


@dataclass(frozen=True)
class CropSample:
    top: int
    left: int
    height: int
    width: int
    target_height: int
    target_width: int
    seed: int


def buckets(policy: CropPolicy) -> list[tuple[int, int]]:
    """Target sizes (height, width): multiples of `step`, aspect ratio within bounds."""
    sides = range(policy.min_side, policy.max_side + 1, policy.step)
    limit = policy.max_aspect_ratio
    return [(h, w) for h in sides for w in sides if 1 / limit <= w / h <= limit]


def target_sizes(policy: CropPolicy) -> list[tuple[int, int]]:
    """Every target size a sample can have: the buckets and the two square anchors."""
    anchors = [(policy.input_side, policy.input_side), (2 * policy.input_side, 2 * policy.input_side)]
    return sorted(set(buckets(policy)) | set(anchors))


def sample_seed(seed: int, key: str, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # fits int64


def largest_crop(image_height: int, image_width: int, aspect: float) -> tuple[int, int]:
    """The largest crop of width/height `aspect` inside the image."""
    if image_width / image_height >= aspect:
        return image_height, int(image_height * aspect)
    return int(image_width / aspect), image_width


def plan_crops(
    key: str, image_height: int, image_width: int, count: int, seed: int, policy: CropPolicy
) -> list[CropSample]:
    """`count` samples from one image; [] when no target fits inside it without upscaling."""
    anchors = [(policy.input_side, policy.input_side), (2 * policy.input_side, 2 * policy.input_side)]
    fits = lambda size: largest_crop(image_height, image_width, size[1] / size[0])[0] >= size[0]  # noqa: E731
    anchors = [size for size in anchors if fits(size)]
    sizes = [size for size in buckets(policy) if fits(size)]
    if not sizes and not anchors:
        return []
    samples = []
    for index in range(count):
        seed_here = sample_seed(seed, key, index)
        rng = np.random.default_rng(seed_here)
        use_anchor = anchors and (not sizes or rng.random() < policy.anchor_share)
        pool = anchors if use_anchor else sizes
        target_height, target_width = pool[int(rng.integers(len(pool)))]
        aspect = target_width / target_height
        max_height, _ = largest_crop(image_height, image_width, aspect)
        height = int(rng.integers(target_height, max_height + 1))
        width = min(image_width, max(target_width, round(height * aspect)))
        top = int(rng.integers(0, image_height - height + 1))
        left = int(rng.integers(0, image_width - width + 1))
        samples.append(CropSample(top, left, height, width, target_height, target_width, seed_here))
    return samples


def centred_sample(image_height: int, image_width: int, size: tuple[int, int]) -> CropSample:
    """The largest centred crop with the aspect ratio of `size` (height, width), resized to `size`."""
    height, width = size
    crop_height, crop_width = largest_crop(image_height, image_width, width / height)
    return CropSample(top=(image_height - crop_height) // 2, left=(image_width - crop_width) // 2,
                      height=crop_height, width=crop_width, target_height=height, target_width=width,
                      seed=0)  # fmt: skip


def crop_pair(image: Image.Image, sample: CropSample, input_side: int) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input input_side²×3, ground truth target_h×target_w×3), uint8. Pillow's BICUBIC resize
    filters in proportion to the scale, so downscaling is antialiased."""
    box = (sample.left, sample.top, sample.left + sample.width, sample.top + sample.height)
    crop = image.crop(box)
    encoder_input = crop.resize((input_side, input_side), Image.BICUBIC)
    truth = crop.resize((sample.target_width, sample.target_height), Image.BICUBIC)
    return np.asarray(encoder_input), np.asarray(truth)
