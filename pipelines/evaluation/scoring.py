"""One work unit of the evaluation: a chunk of latents of one source at one size → a part file of features
and per-image metrics for both decoders (and for the ground truth, where there is one).

Pure with respect to Ray: `score_chunk` takes loaded models and returns arrays; `ChunkScorer` is the thin Ray
Data actor that loads the models once and writes each chunk's part file, the unit of resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time

import fsspec
import numpy as np
import torch

from infgen.devices import assert_same_device, default_device, module_device
from infgen.images import from_uint8
from infgen.metrics import psnr, ssim
from infgen.metrics.distribution import extract_patches, patch_boxes
from pipelines.common.grids import comparison_grid
from pipelines.common.reconstruction import encode_crops, read_images
from pipelines.evaluation.chunks import IMAGE_FOLDER, Chunk
from pipelines.evaluation.config import EvalConfig
from pipelines.evaluation.decoders import DECODERS, LABELS, decode_all
from pipelines.evaluation.image_folder import read_folder_images
from pipelines.evaluation.sources import load_latent_file

REFERENCE = "reference"


def patch_seed(seed: int, source: str, size: tuple[int, int], index: int) -> int:
    """Patch positions depend on (seed, source, size, image), never on chunking or worker."""
    text = f"{seed}:{source}:{size[0]}x{size[1]}:{index}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def image_features(inception, images: list[np.ndarray], boxes: list[list], config: EvalConfig) -> dict:
    """Whole-image and patch Inception features for a list of H×W×3 uint8 images."""
    whole = inception.features(np.stack(images))
    patches = np.concatenate([extract_patches(image.transpose(2, 0, 1), image_boxes, config.patch_size)
                              for image, image_boxes in zip(images, boxes)])  # fmt: skip
    patch = inception.features(patches)
    return {"pool": whole["pool"], "spatial": whole["spatial"],
            "patch_pool": patch["pool"], "patch_spatial": patch["spatial"]}  # fmt: skip


def full_reference(decoded: list[np.ndarray], truths: list[np.ndarray], lpips_model) -> dict:
    """PSNR, SSIM and LPIPS of each decoded image against its ground truth ([-1, 1] scale)."""
    prediction = torch.stack([from_uint8(image) for image in decoded])
    target = torch.stack([from_uint8(image) for image in truths])
    perceptual = perceptual_distances(lpips_model, prediction, target)
    return {"psnr": psnr(prediction, target).numpy(), "ssim": ssim(prediction, target).numpy(),
            "lpips": perceptual.double().cpu().numpy()}  # fmt: skip


def perceptual_distances(lpips_model, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LPIPS per image pair, on the LPIPS network's device (the images are built on the host)."""
    device = module_device(lpips_model)
    prediction, target = prediction.to(device), target.to(device)
    assert_same_device(lpips_model, prediction, target)
    with torch.inference_mode():
        return lpips_model(prediction, target).flatten()


def score_chunk(chunk: Chunk, latents: np.ndarray, truths: list | None, models: dict, config: EvalConfig):
    """{group: {array name: array}} for the chunk, plus the decoded images (for the comparison grids)."""
    size = chunk.size
    decoded = decode_all(models["infgen"], models["vae"], torch.from_numpy(latents), size,
                         config.baseline_resample, config.decode_batch)  # fmt: skip
    boxes = [patch_boxes(size[0], size[1], config.patch_size, config.patches_per_image, config.patch_mode,
                         patch_seed(config.seed, chunk.source, size, chunk.start + offset))
             for offset in range(len(latents))]  # fmt: skip
    groups: dict[str, dict] = {name: {} for name in DECODERS}
    for name in DECODERS:
        if not chunk.full_reference_only:
            groups[name].update(image_features(models["inception"], decoded[name], boxes, config))
        if truths is not None:
            groups[name].update(full_reference(decoded[name], truths, models["lpips"]))
    if truths is not None and not chunk.full_reference_only:
        groups[REFERENCE] = image_features(models["inception"], truths, boxes, config)
    return groups, decoded


def save_part(path: str, groups: dict, keys: list[str], meta: dict) -> None:
    """One .npz per chunk, written whole then renamed: a part file that exists is complete."""
    arrays = {f"{group}/{name}": np.asarray(value, dtype=np.float32 if value.ndim > 1 else np.float64)
              for group, values in groups.items() for name, value in values.items()}  # fmt: skip
    arrays["keys"] = np.array(keys)
    arrays["meta"] = np.array(json.dumps(meta))  # which extractor and LPIPS trunk made these numbers
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    filesystem, local = fsspec.core.url_to_fs(path)
    filesystem.makedirs(local.rsplit("/", 1)[0], exist_ok=True)
    filesystem.pipe_file(f"{local}.tmp", buffer.getvalue())
    filesystem.mv(f"{local}.tmp", local)


def load_part(path: str) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """({group: {array name: array}}, meta) of a part file."""
    with fsspec.open(path, "rb") as handle:
        archive = np.load(io.BytesIO(handle.read()), allow_pickle=False)
        meta = json.loads(str(archive["meta"]))
        groups: dict[str, dict[str, np.ndarray]] = {}
        for name in archive.files:
            if "/" in name:
                group, array = name.split("/", 1)
                groups.setdefault(group, {})[array] = archive[name]
    return groups, meta


def scoring_modules(models: dict) -> dict:
    """{name: nn.Module} of the scorer's models (the VAE and Inception wrap theirs)."""
    return {"vae": models["vae"].autoencoder, "infgen": models["infgen"],
            "inception": models["inception"].network, "lpips": models["lpips"]}  # fmt: skip


def check_models_on(models: dict, device: str) -> None:
    """Every model on `device` (its type: "cuda" means whichever GPU Ray gave this process)."""
    wanted = torch.device(device).type
    for name, module in scoring_modules(models).items():
        found = module_device(module)
        if found.type != wanted:
            raise ValueError(f"evaluation: the {name} model is on {found}, the scorer runs on {device}")


def channels_last(*networks) -> None:
    """Convolution weights in channels-last layout: oneDNN's fast path on CPU, about 1.5× faster for
    Inception (measured: 0.36 → 0.24 CPU s per image). The same arithmetic in another memory order: features
    equal to float32 rounding (4e-7 relative on pool_3), so no metric changes meaning."""
    for network in networks:
        network.to(memory_format=torch.channels_last)


class ChunkScorer:
    """Ray Data actor: loads InfGen, the stock VAE, Inception and LPIPS once, then scores chunks. Its rows
    name a chunk by its index in `chunks` (typed records, handed to each actor once)."""

    def __init__(self, config: EvalConfig, decoder: str, vae: str | None, input_side: int,
                 chunks: list[Chunk], threads: int = 1, device: str | None = None):  # fmt: skip
        import infgen
        from infgen.metrics.inception import load_inception
        from infgen.metrics.perceptual import load_lpips
        from pipelines.common.vae_source import load_frozen_vae

        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        device = device or default_device()  # injectable: a CPU test runs this same path with "cpu"
        self.config, self.device, self.input_side, self.chunks = config, device, input_side, chunks
        stock, _ = load_frozen_vae(vae, device)
        self.models = {"vae": stock, "infgen": infgen.load(decoder, device=device),
                       "inception": load_inception(config.inception, device=device),
                       "lpips": load_lpips(config.lpips_trunk).to(device).eval()}  # fmt: skip
        check_models_on(self.models, device)
        if device == "cpu":
            channels_last(self.models["inception"].network, self.models["lpips"])
        self.latent_files: dict[str, np.ndarray] = {}
        inception, perceptual = self.models["inception"], self.models["lpips"]
        self.meta = {"extractor": inception.name, "extractor_is_substitute": inception.is_substitute,
                     "lpips_trunk_pretrained": bool(getattr(perceptual, "trunk_is_pretrained", False)),
                     "device": device}  # fmt: skip

    def latents_for(self, chunk: Chunk) -> tuple[np.ndarray, list | None]:
        if chunk.refs is not None:  # an image source (held out, or a folder): crop pairs, encoded here
            refs = list(chunk.refs)
            images = read_folder_images(refs) if chunk.source == IMAGE_FOLDER else read_images(refs)
            return encode_crops(self.models["vae"], images, chunk.size, self.input_side)
        if chunk.file not in self.latent_files:
            channels = self.models["vae"].latent_channels
            self.latent_files[chunk.file] = load_latent_file(chunk.file, channels)
        return self.latent_files[chunk.file][chunk.start : chunk.start + chunk.count], None

    def __call__(self, batch: dict) -> dict:
        parts, counts, seconds = [], [], []
        for index in batch["index"]:
            # CPU seconds of this process (all threads): what a chunk costs, whatever else the machine runs
            cpu_started = time.process_time()
            chunk = self.chunks[int(index)]
            latents, truths = self.latents_for(chunk)
            groups, decoded = score_chunk(chunk, latents, truths, self.models, self.config)
            keys = (
                list(chunk.keys)
                if chunk.keys is not None
                else [str(chunk.start + i) for i in range(len(latents))]
            )
            save_part(chunk.part, groups, keys, self.meta)
            if chunk.start == 0:
                save_grid(chunk.grid, decoded, truths, self.config.grid_images)
            parts.append(chunk.part)
            counts.append(len(latents))
            seconds.append(time.process_time() - cpu_started)
        return {"part": np.array(parts), "images": np.array(counts), "cpu_seconds": np.array(seconds)}


def save_grid(path: str, decoded: dict, truths: list | None, rows: int) -> None:
    """Rows of [truth |] stock + resize | InfGen at full resolution under their labels, each row followed by
    its centres zoomed 4× (pipelines/common/grids.py), as one PNG."""
    from PIL import Image

    labels = (["truth"] if truths is not None else []) + [LABELS[name] for name in DECODERS]
    lines = []
    for index in range(min(rows, len(decoded[DECODERS[0]]))):
        lines.append(
            ([truths[index]] if truths is not None else []) + [decoded[name][index] for name in DECODERS]
        )
    buffer = io.BytesIO()
    Image.fromarray(comparison_grid(lines, labels)).save(buffer, format="PNG")
    filesystem, local = fsspec.core.url_to_fs(path)
    filesystem.makedirs(local.rsplit("/", 1)[0], exist_ok=True)
    filesystem.pipe_file(local, buffer.getvalue())
