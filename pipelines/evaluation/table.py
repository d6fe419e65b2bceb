"""Part files → the plug-in gains table: source × size × decoder → metrics, and InfGen's change in %.

Distribution metrics compare each decoder's images with the ground truth of the same held-out images at the
same size (the reference set, shared by every source at that size): FID/KID/precision/recall on whole images,
sFID on the ADM spatial features, FIDp/sFIDp on native-resolution patches.
"""

from __future__ import annotations

import numpy as np

from infgen.metrics.distribution import frechet_distance, kernel_inception_distance, precision_recall
from pipelines.evaluation.config import EvalConfig
from pipelines.evaluation.decoders import BASELINE, DECODERS, INFGEN

# (name, lower is better)
METRICS = (
    ("fid", True),
    ("kid", True),
    ("sfid", True),
    ("fidp", True),
    ("sfidp", True),
    ("precision", False),
    ("recall", False),
    ("psnr", False),
    ("ssim", False),
    ("lpips", True),
)


def concatenate(parts: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, list]] = {}
    for part in parts:
        for group, arrays in part.items():
            for name, array in arrays.items():
                groups.setdefault(group, {}).setdefault(name, []).append(array)
    return {
        g: {n: np.concatenate(a).astype(np.float64) for n, a in arrays.items()}
        for g, arrays in groups.items()
    }


def decoder_metrics(ours: dict, reference: dict, config: EvalConfig) -> dict[str, float]:
    count = len(ours["pool"])
    values = {
        "images": float(count),
        "fid": frechet_distance(ours["pool"], reference["pool"]),
        "kid": kernel_inception_distance(ours["pool"], reference["pool"], num_subsets=config.kid_subsets,
                                         max_subset_size=min(config.kid_subset_size, count),
                                         seed=config.seed),
        "sfid": frechet_distance(ours["spatial"], reference["spatial"]),
        "fidp": frechet_distance(ours["patch_pool"], reference["patch_pool"]),
        "sfidp": frechet_distance(ours["patch_spatial"], reference["patch_spatial"]),
    }  # fmt: skip
    values["precision"], values["recall"] = precision_recall(reference["pool"], ours["pool"],
                                                             k=config.precision_recall_k)  # fmt: skip
    for name in ("psnr", "ssim", "lpips"):
        if name in ours:
            finite = ours[name][np.isfinite(ours[name])]  # identical images give PSNR +inf
            values[name] = float(finite.mean()) if len(finite) else float("inf")
    return {name: float(value) for name, value in values.items()}


def gains_rows(results: dict, reference: dict, config: EvalConfig) -> list[dict]:
    """results: {(source, size): concatenated groups}; reference: {size: reference group}."""
    rows = []
    for (source, size), groups in sorted(results.items()):
        metrics = {name: decoder_metrics(groups[name], reference[size], config) for name in DECODERS}
        for name in DECODERS:
            row = {"source": source, "size": f"{size[0]}x{size[1]}", "decoder": name, **metrics[name]}
            if name == INFGEN:
                for metric, _ in METRICS:
                    base = metrics[BASELINE].get(metric)
                    if base is not None and metric in metrics[INFGEN] and base != 0 and np.isfinite(base):
                        row[f"{metric}_change_pct"] = round(
                            100 * (metrics[INFGEN][metric] - base) / abs(base), 2
                        )
            rows.append(row)
    return rows


def markdown(rows: list[dict], extractor: str) -> str:
    present = [m for m, _ in METRICS if any(m in row for row in rows)]
    header = "| source | size | decoder | " + " | ".join(present) + " |"
    lines = [header, "|" + "---|" * (3 + len(present))]
    lower_better = dict(METRICS)
    for row in rows:
        cells = []
        for metric in present:
            value = row.get(metric)
            if value is None:
                cells.append("–")
                continue
            text = (
                f"{value:.4f}"
                if metric in ("kid", "precision", "recall", "ssim", "lpips")
                else f"{value:.2f}"
            )
            change = row.get(f"{metric}_change_pct")
            if change is not None:
                better = (change < 0) == lower_better[metric]
                mark = "" if change == 0 else " ✓" if better else " ✗"
                text += f" ({'+' if change >= 0 else ''}{change:.1f}%{mark})"
            cells.append(text)
        lines.append(f"| {row['source']} | {row['size']} | {row['decoder']} | " + " | ".join(cells) + " |")
    note = (f"\nFeatures: {extractor}. Changes are InfGen relative to the stock VAE decoder + "
            "resize; ✓ marks an improvement.\n")  # fmt: skip
    return "\n".join(lines) + "\n" + note
