"""Feature-extraction benchmark: the evaluation stage's Inception path against clean-fid's `compute_fid`.

Both sides compute the FID between the same two folders of PNG images with the same extractor (the
configured Inception weights, or the labelled substitute), on the CPU, in this process, one after the
other:

- **clean-fid**: `cleanfid.fid.compute_fid(folder_a, folder_b, mode="clean",
  custom_feat_extractor=inception.clean_fid_module(), device=cpu, num_workers=0, batch_size=B)`: its own
  file loader, clean resize and pool_3 features, then its Fréchet distance.
- **ours**: what the stage's actors do per chunk (`pipelines/evaluation/scoring.image_features`): decode the
  files with PIL, `InceptionFeatures.features` in batches of B (the same clean resize; pool_3 and the sFID
  spatial features from one forward pass), then `infgen.metrics.distribution.frechet_distance`.

Throughput is images per second of the feature extraction over both folders (wall time, after one untimed
warm-up batch on each side); the Fréchet distance is timed apart (clean-fid's `scipy.linalg.sqrtm` of the
2048² product takes seconds; ours takes the exact low-rank route when there are fewer images than
dimensions), and clean-fid's `compute_fid` is run once more end to end for the value compared.
Targets: extraction ours / clean-fid ≥ 0.9, and our FID equal to `compute_fid`'s within 1e-3.

    .venv/bin/python bench/eval.py [--images 64] [--size 256] [--batch 32] [--inception PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.report import emit  # noqa: E402

TARGET_RATIO = 0.9
FID_TOLERANCE = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images per folder (two folders)")
    parser.add_argument("--size", type=int, default=256, help="square image side")
    parser.add_argument("--batch", type=int, default=32, help="images per Inception forward, both sides")
    parser.add_argument("--inception", help="clean-fid's inception-2015-12-05.pt (default: the usual places)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output", help="also write the markdown report to this file")
    return parser.parse_args(argv)


def write_folder(folder: Path, count: int, size: int, first_seed: int) -> list[Path]:
    from infgen.substitutes.synthetic import make_image

    folder.mkdir(parents=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:05d}.png"
        Image.fromarray(make_image(first_seed + index, size, size)).save(path)
        paths.append(path)
    return paths


def read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def ours(inception, folders: list[list[Path]], batch: int) -> dict:
    """The stage's extraction path over both folders, then our Fréchet distance, each timed."""
    from infgen.metrics.distribution import frechet_distance

    inception.features(np.stack([read_rgb(path) for path in folders[0][:batch]]))  # warm-up
    started = time.perf_counter()
    pools = []
    for paths in folders:
        chunks = []
        for start in range(0, len(paths), batch):
            images = np.stack([read_rgb(path) for path in paths[start : start + batch]])
            chunks.append(inception.features(images)["pool"])
        pools.append(np.concatenate(chunks))
    extracted = time.perf_counter()
    fid = frechet_distance(pools[0], pools[1])
    return {"extract_s": extracted - started, "fid_s": time.perf_counter() - extracted, "fid": fid}


def clean_fid(inception, directories: list[Path], batch: int, warmup: Path) -> dict:
    """clean-fid's own folder features (its loader and resize) and Fréchet distance, each timed; then
    `compute_fid` end to end, whose value the comparison uses."""
    from cleanfid import fid as cleanfid

    module = inception.clean_fid_module()
    common = dict(mode="clean", device=torch.device("cpu"), num_workers=0, batch_size=batch, verbose=False)
    cleanfid.get_folder_features(str(warmup), module, **common)  # warm-up: one batch through the same path
    started = time.perf_counter()
    features = [cleanfid.get_folder_features(str(directory), module, **common) for directory in directories]
    extracted = time.perf_counter()
    statistics = [(np.mean(f, axis=0), np.cov(f, rowvar=False)) for f in features]
    cleanfid.frechet_distance(*statistics[0], *statistics[1])
    distance_s = time.perf_counter() - extracted
    value = cleanfid.compute_fid(
        str(directories[0]), str(directories[1]), custom_feat_extractor=module, **common
    )
    return {"extract_s": extracted - started, "fid_s": distance_s, "fid": float(value)}


def row(name: str, result: dict, images: int) -> str:
    extract, distance, fid = result["extract_s"], result["fid_s"], result["fid"]
    return f"| {name} | {extract:.2f} | {images / extract:.2f} | {distance:.3f} | {fid:.6f} |"


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from infgen.metrics.inception import load_inception

    inception = load_inception(args.inception, batch_size=args.batch)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folders = [write_folder(root / name, args.images, args.size, seed)
                   for name, seed in (("a", 0), ("b", 10_000))]  # fmt: skip
        warmup = root / "warmup"
        warmup.mkdir()
        for path in folders[0][: args.batch]:
            (warmup / path.name).symlink_to(path)
        reference = clean_fid(inception, [root / "a", root / "b"], args.batch, warmup)
        measured = ours(inception, folders, args.batch)
    total = 2 * args.images
    ratio = reference["extract_s"] / measured["extract_s"]
    difference = abs(measured["fid"] - reference["fid"])
    load = f"load {load_before:.1f} → {os.getloadavg()[0]:.1f}"
    lines = [
        f"# bench/eval.py: {total} images of {args.size}² ({args.images} per folder), batch {args.batch}, "
        f"{args.threads} threads, torch {torch.__version__}, {load}",
        f"extractor: {inception.name}",
        "",
        "| path | extraction s | images/s | Fréchet distance s | FID |",
        "|---|---|---|---|---|",
        row("clean-fid (get_folder_features, frechet_distance)", reference, total),
        row("ours (the stage's InceptionFeatures.features, frechet_distance)", measured, total),
        "",
        f"extraction throughput ours / clean-fid: {ratio:.3f} (target ≥ {TARGET_RATIO}: "
        f"{verdict(ratio >= TARGET_RATIO)})",
        f"|FID ours − clean-fid compute_fid|: {difference:.2e} (target ≤ {FID_TOLERANCE}: "
        f"{verdict(difference <= FID_TOLERANCE)})",
    ]
    emit(lines, args.output)
    return 0 if ratio >= TARGET_RATIO and difference <= FID_TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
