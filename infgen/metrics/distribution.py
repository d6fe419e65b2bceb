"""Distribution metrics on feature arrays (FID, sFID, KID, precision/recall) and patch crops for FIDp/sFIDp.

Everything here takes float64 numpy arrays of shape (N, D), one row per image, as infgen.metrics.inception
returns them: FID is `frechet_distance` on the "pool" features, sFID the same on the "spatial" features. The
Fréchet distance and KID reproduce clean-fid 0.1.35 (cleanfid/fid.py) operation for operation, so values
agree with clean-fid's on the same features; the tests check both.

Patch metrics (FIDp/sFIDp) compare crops taken at native resolution, so that a high-resolution decoder is
judged on its detail rather than on a 299×299 thumbnail; `patch_boxes` and `extract_patches` choose and cut
them. The paper never defined its FIDp protocol (docs/paper.md, "Evaluation protocol"), so crop size, count,
mode and seed are all arguments, to be recorded with the numbers.

scipy (the `pipeline` extra) is imported by `frechet_distance` only, for its matrix square root.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from infgen._extras import import_extra

logger = logging.getLogger(__name__)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets: FID on pool_3, sFID on spatial features.

    ||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^½), with np.cov's unbiased (N - 1) covariance, as
    clean-fid's fid_from_feats and frechet_distance compute it, including their fallback: when the matrix
    square root is not finite, `eps` is added to both diagonals; a square root with imaginary diagonal parts
    above 1e-3 is an error.
    """
    features_a = _check_features(features_a, "features_a", minimum_rows=2)
    features_b = _check_features(features_b, "features_b", minimum_rows=2)
    _check_same_dimension(features_a, features_b)
    if max(len(features_a), len(features_b)) < features_a.shape[1]:
        return _low_rank_frechet_distance(features_a, features_b)
    linalg = import_extra("scipy.linalg", "scipy", "The Fréchet distance (FID, sFID)")
    mean_a, covariance_a = np.mean(features_a, axis=0), np.atleast_2d(np.cov(features_a, rowvar=False))
    mean_b, covariance_b = np.mean(features_b, axis=0), np.atleast_2d(np.cov(features_b, rowvar=False))
    difference = mean_a - mean_b
    # The product of two covariances estimated from fewer samples than dimensions is singular; scipy then
    # warns and still returns a usable root, as in clean-fid (its `disp=False` only added an error estimate).
    covariance_mean = linalg.sqrtm(covariance_a.dot(covariance_b))
    if not np.isfinite(covariance_mean).all():
        logger.warning("Fréchet distance: singular covariance product; adding %s to the diagonals", eps)
        offset = np.eye(covariance_a.shape[0]) * eps
        covariance_mean = linalg.sqrtm((covariance_a + offset).dot(covariance_b + offset))
    if np.iscomplexobj(covariance_mean):
        # The product of two PSD matrices has real, non-negative eigenvalues: imaginary parts are rounding.
        if not np.allclose(np.diagonal(covariance_mean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covariance_mean.imag))}")
        covariance_mean = covariance_mean.real
    trace_mean = np.trace(covariance_mean)
    distance = difference.dot(difference) + np.trace(covariance_a) + np.trace(covariance_b) - 2 * trace_mean
    return float(distance)


def _low_rank_frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The same distance, exactly, when both sets have fewer samples than dimensions (small evaluations).

    With centred features A (n_a × D) and B (n_b × D), S_a S_b = AᵀA BᵀB / c with c = (n_a - 1)(n_b - 1);
    its non-zero eigenvalues are those of (ABᵀ)(ABᵀ)ᵀ / c, so Tr (S_a S_b)^½ is the sum of the singular values
    of ABᵀ over √c: an n_a × n_b SVD instead of a D × D matrix square root (2048² took ~20 s on 2 cores) that
    is singular here anyway.
    """
    centred_a = features_a - features_a.mean(axis=0)
    centred_b = features_b - features_b.mean(axis=0)
    scale = (len(features_a) - 1) * (len(features_b) - 1)
    trace_mean = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum() / np.sqrt(scale)
    difference = features_a.mean(axis=0) - features_b.mean(axis=0)
    trace_a = np.square(centred_a).sum() / (len(features_a) - 1)
    trace_b = np.square(centred_b).sum() / (len(features_b) - 1)
    return float(difference.dot(difference) + trace_a + trace_b - 2 * trace_mean)


def kernel_inception_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """KID: the unbiased MMD² estimate with kernel (x·y / D + 1)³, averaged over random equal-size subsets.

    Matches cleanfid.fid.kernel_distance(features_a, features_b, num_subsets, max_subset_size) value for
    value. clean-fid draws subsets from numpy's global RNG; we draw the same calls (subset of b, then of a,
    per round) from our own `np.random.RandomState(seed)`, the generator behind the global one, so the result
    depends only on `seed` and equals clean-fid's after `np.random.seed(seed)`.
    """
    features_a = _check_features(features_a, "features_a", minimum_rows=2)
    features_b = _check_features(features_b, "features_b", minimum_rows=2)
    _check_same_dimension(features_a, features_b)
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be at least 1, got {num_subsets}")
    if max_subset_size < 2:
        raise ValueError(
            f"max_subset_size must be at least 2 (the estimate divides by m - 1), got {max_subset_size}"
        )
    random_state = np.random.RandomState(seed)
    dimension = features_a.shape[1]
    subset_size = min(features_a.shape[0], features_b.shape[0], max_subset_size)
    total = 0
    for _ in range(num_subsets):
        x = features_b[random_state.choice(features_b.shape[0], subset_size, replace=False)]
        y = features_a[random_state.choice(features_a.shape[0], subset_size, replace=False)]
        within = (x @ x.T / dimension + 1) ** 3 + (y @ y.T / dimension + 1) ** 3
        between = (x @ y.T / dimension + 1) ** 3
        # Off-diagonal means within each set (unbiased), minus twice the mean across sets.
        total += (within.sum() - np.diag(within).sum()) / (subset_size - 1) - between.sum() * 2 / subset_size
    return float(total / num_subsets / subset_size)


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, chunk_size: int = 256
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-nearest-neighbour manifolds.

    Each set's manifold is the union of balls around its points, each ball's radius the distance to that
    point's k-th nearest other point of the same set. Precision: the fraction of fake points inside the real
    manifold (are samples realistic?); recall: the fraction of real points inside the fake manifold (is the
    data covered?). Pairwise distances are computed `chunk_size` rows at a time, so 50k × 50k never exists at
    once.
    """
    real = _check_features(real, "real", minimum_rows=k + 1)
    fake = _check_features(fake, "fake", minimum_rows=k + 1)
    _check_same_dimension(real, fake)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    real_radii = _squared_knn_radii(real, k, chunk_size)
    fake_radii = _squared_knn_radii(fake, k, chunk_size)
    precision = _fraction_inside(fake, real, real_radii, chunk_size)
    recall = _fraction_inside(real, fake, fake_radii, chunk_size)
    return precision, recall


def _squared_distances(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """(len(rows), len(columns)) squared Euclidean distances, via |a|² - 2ab + |b|² (clipped at 0)."""
    squared = (rows**2).sum(axis=1)[:, None] - 2 * rows @ columns.T + (columns**2).sum(axis=1)[None, :]
    return np.maximum(squared, 0.0)


def _squared_knn_radii(points: np.ndarray, k: int, chunk_size: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point."""
    radii = np.empty(points.shape[0])
    for start in range(0, points.shape[0], chunk_size):
        chunk = points[start : start + chunk_size]
        squared = _squared_distances(chunk, points)
        rows = np.arange(chunk.shape[0])
        squared[rows, start + rows] = 0.0  # each point's distance to itself, exactly; it sorts first
        radii[start : start + chunk.shape[0]] = np.partition(squared, k, axis=1)[:, k]  # index 0 is the self
    return radii


def _fraction_inside(
    queries: np.ndarray, centres: np.ndarray, squared_radii: np.ndarray, chunk_size: int
) -> float:
    """The fraction of `queries` within the ball of at least one of `centres`."""
    inside = 0
    for start in range(0, queries.shape[0], chunk_size):
        squared = _squared_distances(queries[start : start + chunk_size], centres)
        inside += int((squared <= squared_radii[None, :]).any(axis=1).sum())
    return inside / queries.shape[0]


def patch_boxes(
    height: int,
    width: int,
    size: int = 256,
    count: int | None = None,
    mode: str = "grid",
    seed: int = 0,
    image_index: int = 0,
) -> list[tuple[int, int]]:
    """(top, left) corners of `size`×`size` crops of a height×width image, for patch FID at native resolution.

    mode="grid": the largest grid of non-overlapping tiles that fits (height // size rows, width // size
    columns), spread evenly from edge to edge (a single row or column is centred); with `count`, at most
    `count` of those tiles, picked evenly along the raster order. mode="random": `count` (required) uniformly
    random corners, possibly overlapping, drawn from a generator seeded with (seed, image_index), so each
    image of a set gets its own crops and every rerun the same ones.
    """
    if size < 1:
        raise ValueError(f"patch size must be at least 1, got {size}")
    if height < size or width < size:
        raise ValueError(f"image of {height}×{width} (height×width) is smaller than the {size}×{size} patch")
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1 (or None), got {count}")
    if mode == "grid":
        tops = _spread(height, size)
        lefts = _spread(width, size)
        boxes = [(top, left) for top in tops for left in lefts]
        if count is not None and count < len(boxes):
            picks = np.round(np.linspace(0, len(boxes) - 1, count)).astype(int)
            boxes = [boxes[index] for index in picks]
        return boxes
    if mode == "random":
        if count is None:
            raise ValueError("mode='random' needs a patch count")
        generator = np.random.default_rng([seed, image_index])
        tops = generator.integers(0, height - size + 1, size=count)
        lefts = generator.integers(0, width - size + 1, size=count)
        return [(int(top), int(left)) for top, left in zip(tops, lefts)]
    raise ValueError(f"unknown patch mode {mode!r}; expected 'grid' or 'random'")


def _spread(length: int, size: int) -> list[int]:
    """Starts of length // size non-overlapping tiles spread over [0, length], first at 0 and last at the end.

    The spacing (length - size) / (tiles - 1) is at least `size` because tiles * size <= length, and rounding
    to integers keeps consecutive starts at least `size` apart, so tiles never overlap.
    """
    tiles = length // size
    if tiles == 1:
        return [(length - size) // 2]
    spacing = (length - size) / (tiles - 1)
    return [round(index * spacing) for index in range(tiles)]


def extract_patches(
    image: np.ndarray | torch.Tensor, boxes: list[tuple[int, int]], size: int
) -> np.ndarray | torch.Tensor:
    """Cut `size`×`size` crops at `boxes` from a (C, H, W) image → (len(boxes), C, size, size), same type."""
    if image.ndim != 3:
        raise ValueError(f"expected one image shaped (C, H, W), got shape {tuple(image.shape)}")
    height, width = image.shape[1:]
    for top, left in boxes:
        if top < 0 or left < 0 or top + size > height or left + size > width:
            raise ValueError(
                f"patch at (top={top}, left={left}) of size {size} leaves the {height}×{width} image"
            )
    crops = [image[:, top : top + size, left : left + size] for top, left in boxes]
    if isinstance(image, torch.Tensor):
        return torch.stack(crops) if crops else image.new_empty((0, image.shape[0], size, size))
    return np.stack(crops) if crops else np.empty((0, image.shape[0], size, size), dtype=image.dtype)


def _check_features(features: np.ndarray, name: str, minimum_rows: int) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples, dimensions), got shape {features.shape}")
    if features.shape[0] < minimum_rows:
        raise ValueError(f"{name} needs at least {minimum_rows} samples, got {features.shape[0]}")
    if features.shape[1] < 1:
        raise ValueError(f"{name} has no feature dimensions (shape {features.shape})")
    if not np.issubdtype(features.dtype, np.number) or np.iscomplexobj(features):
        raise ValueError(f"{name} must be real numbers, got dtype {features.dtype}")
    features = features.astype(np.float64, copy=False)
    if not np.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return features


def _check_same_dimension(features_a: np.ndarray, features_b: np.ndarray) -> None:
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"feature sets have different dimensions: {features_a.shape[1]} vs {features_b.shape[1]}"
        )
