"""Part files → the plug-in gains table: source × size × decoder → metrics, and InfGen's change in %.

Distribution metrics compare each decoder's images with the ground truth of the same held-out images at the
same size (the reference set, shared by every latent source at that size): FID/KID/precision/recall on whole
images, sFID on the ADM spatial features, FIDp/sFIDp on native-resolution patches. An image folder (a few real
photographs) is scored on PSNR/SSIM/LPIPS against its own ground truth only.
"""

from __future__ import annotations

import numpy as np

from infgen.metrics.distribution import frechet_distance, kernel_inception_distance, precision_recall
from pipelines.evaluation.chunks import IMAGE_SOURCES
from pipelines.evaluation.config import EvalConfig
from pipelines.evaluation.decoders import BASELINE, DECODERS, INFGEN, LABELS

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
# KID is an unbiased estimate that sits near 0 (and may go below it) for close sets: a ratio of two such
# numbers is noise, so the table gives its values only. Any other metric whose baseline is near 0 on its own
# scale gets no relative change either: SSIM, precision and recall live in [0, 1], where a baseline of 0.01
# turns any difference into a percentage in the hundreds.
NO_RELATIVE_CHANGE = ("kid",)
NEAR_ZERO = {"ssim": 0.05, "precision": 0.05, "recall": 0.05}
NEAR_ZERO_DEFAULT = 1e-6


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


def distribution_metrics(ours: dict, reference: dict, config: EvalConfig) -> dict[str, float]:
    count = len(ours["pool"])
    values = {
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
    return values


def decoder_metrics(ours: dict, reference: dict | None, config: EvalConfig) -> dict[str, float]:
    """Distribution metrics where there are features and a reference; full-reference metrics where there
    was ground truth."""
    count = len(next(iter(ours.values())))
    values = {"images": float(count)}
    if "pool" in ours and reference is not None:
        values.update(distribution_metrics(ours, reference, config))
    for name in ("psnr", "ssim", "lpips"):
        if name in ours:
            finite = ours[name][np.isfinite(ours[name])]  # identical images give PSNR +inf
            values[name] = float(finite.mean()) if len(finite) else float("inf")
    return {name: float(value) for name, value in values.items()}


def relative_changes(ours: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """{METRIC_change_pct}: InfGen's change relative to the baseline, where a ratio means something."""
    changes = {}
    for metric, _ in METRICS:
        if metric in NO_RELATIVE_CHANGE or metric not in ours or metric not in base:
            continue
        if np.isfinite(base[metric]) and abs(base[metric]) > NEAR_ZERO.get(metric, NEAR_ZERO_DEFAULT):
            changes[f"{metric}_change_pct"] = round(
                100 * (ours[metric] - base[metric]) / abs(base[metric]), 2
            )
    return changes


def source_order(source: str) -> tuple:
    """Image sources first (held out, then the folder), then latent sources by name."""
    return (IMAGE_SOURCES.index(source), "") if source in IMAGE_SOURCES else (len(IMAGE_SOURCES), source)


def gains_rows(results: dict, reference: dict, config: EvalConfig) -> list[dict]:
    """results: {(source, size): concatenated groups}; reference: {size: reference group}."""
    rows = []
    ordered = sorted(results.items(), key=lambda item: (source_order(item[0][0]), item[0][1]))
    for (source, size), groups in ordered:
        metrics = {name: decoder_metrics(groups[name], reference.get(size), config) for name in DECODERS}
        for name in DECODERS:
            row = {"source": source, "size": f"{size[0]}x{size[1]}", "decoder": name, **metrics[name]}
            if name == INFGEN:
                row.update(relative_changes(metrics[INFGEN], metrics[BASELINE]))
            rows.append(row)
    return rows


def _cell(row: dict, metric: str, lower_better: bool) -> str:
    value = row.get(metric)
    if value is None:
        return "–"
    text = f"{value:.4f}" if metric in ("kid", "precision", "recall", "ssim", "lpips") else f"{value:.2f}"
    change = row.get(f"{metric}_change_pct")
    if change is not None:
        better = (change < 0) == lower_better
        mark = "" if change == 0 else " ✓" if better else " ✗"
        text += f" ({'+' if change >= 0 else ''}{change:.1f}%{mark})"
    return text


def markdown(rows: list[dict], notes: list[str]) -> str:
    """The table, source and size first, then `notes` (substitutes, skipped images) as its footer."""
    present = [m for m, _ in METRICS if any(m in row for row in rows)]
    lines = ["| source | size | decoder | images | " + " | ".join(present) + " |",
             "|" + "---|" * (4 + len(present))]  # fmt: skip
    lower_better = dict(METRICS)
    for row in rows:
        cells = [_cell(row, metric, lower_better[metric]) for metric in present]
        lines.append(f"| {row['source']} | {row['size']} | {LABELS[row['decoder']]} | {int(row['images'])} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    footer = [
        "Changes are InfGen relative to the stock VAE decoder + resize; ✓ marks an improvement. KID has none "
        "(an unbiased estimate near 0, whose ratio is noise), nor does a metric whose baseline is near 0 "
        "(SSIM, precision, recall below 0.05).",
        *notes,
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {line}" for line in footer) + "\n"


def substitute_notes(
    extractor: str, extractor_is_substitute: bool, lpips_trunk_pretrained: bool
) -> list[str]:
    """Which networks made the numbers, substitutes named as such."""
    if extractor_is_substitute:
        inception = f"FID/KID/sFID/FIDp/sFIDp/precision/recall: {extractor} (a SUBSTITUTE: comparable only "
        inception += "with numbers from the same substitute)."
    else:
        inception = f"FID/KID/sFID/FIDp/sFIDp/precision/recall: {extractor}."
    lpips = "LPIPS: ImageNet AlexNet trunk."
    if not lpips_trunk_pretrained:
        lpips = "LPIPS: a RANDOM AlexNet trunk (a SUBSTITUTE: not comparable with published LPIPS)."
    return [inception, lpips]
