"""Metadata filters for LAION-Aesthetic rows: pure `DataFrame -> bool mask` functions, testable without Ray.

Each rule keeps a row when its mask is True. `first_failed_rule` gives every dropped row exactly one reason
(the first rule it fails, in RULES order), which is what makes the ingest accounting add up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ColumnMap:
    """Where each field lives in a metadata release (LAION V2 'improved aesthetics' names by default)."""

    url: str = "URL"
    caption: str = "TEXT"
    width: str = "WIDTH"
    height: str = "HEIGHT"
    aesthetic: str = "AESTHETIC_SCORE"  # V1 laion-aesthetic releases call it "aesthetic"
    punsafe: str = "punsafe"
    pwatermark: str = "pwatermark"
    similarity: str = "similarity"
    hash: str = "hash"


@dataclass(frozen=True)
class FilterConfig:
    min_pixels: int = 2_000_000  # WIDTH·HEIGHT must exceed this (the paper: ">2 MP")
    min_aesthetic: float = 5.0
    max_punsafe: float = 0.5
    max_pwatermark: float = 0.8
    min_aspect_ratio: float = 0.25  # width / height
    max_aspect_ratio: float = 4.0
    target_count: int | None = None  # cap after filtering and deduplication; None keeps all
    seed: int = 0  # orders the cap: the same seed selects the same rows
    columns: ColumnMap = field(default_factory=ColumnMap)


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(frame[column], errors="coerce")


def valid_url(frame: pd.DataFrame, config: FilterConfig) -> np.ndarray:
    """http(s) URLs with a host; missing, empty or other schemes fail."""

    def ok(url) -> bool:
        if not isinstance(url, str) or not url.strip():
            return False
        try:
            parts = urlsplit(url.strip())
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and bool(parts.hostname)

    return frame[config.columns.url].map(ok).to_numpy(dtype=bool)


def min_pixels(frame: pd.DataFrame, config: FilterConfig) -> np.ndarray:
    pixels = _numeric(frame, config.columns.width) * _numeric(frame, config.columns.height)
    return (pixels > config.min_pixels).fillna(False).to_numpy(dtype=bool)


def aspect_ratio(frame: pd.DataFrame, config: FilterConfig) -> np.ndarray:
    ratio = _numeric(frame, config.columns.width) / _numeric(frame, config.columns.height)
    keep = (ratio >= config.min_aspect_ratio) & (ratio <= config.max_aspect_ratio)
    return keep.fillna(False).to_numpy(dtype=bool)


def aesthetic(frame: pd.DataFrame, config: FilterConfig) -> np.ndarray:
    return (
        (_numeric(frame, config.columns.aesthetic) >= config.min_aesthetic).fillna(False).to_numpy(dtype=bool)
    )


def punsafe(frame: pd.DataFrame, config: FilterConfig) -> np.ndarray:
    return (_numeric(frame, config.columns.punsafe) <= config.max_punsafe).fillna(False).to_numpy(dtype=bool)


def pwatermark(frame: pd.DataFrame, config: FilterConfig) -> np.ndarray:
    column = _numeric(frame, config.columns.pwatermark)
    return (column <= config.max_pwatermark).fillna(False).to_numpy(dtype=bool)


# Order matters only for which reason a row that fails several rules is counted under.
RULES: dict[str, Callable[[pd.DataFrame, FilterConfig], np.ndarray]] = {
    "invalid_url": valid_url,
    "too_few_pixels": min_pixels,
    "aspect_ratio": aspect_ratio,
    "low_aesthetic": aesthetic,
    "unsafe": punsafe,
    "watermark": pwatermark,
}


def first_failed_rule(frame: pd.DataFrame, config: FilterConfig) -> np.ndarray:
    """Per row: the name of the first rule it fails, or "" if it passes them all (object array)."""
    reasons = np.full(len(frame), "", dtype=object)
    for name, rule in RULES.items():
        undecided = reasons == ""
        if not undecided.any():
            break
        failed = undecided & ~rule(frame, config)
        reasons[failed] = name
    return reasons


def selection_order(urls: pd.Series, seed: int) -> np.ndarray:
    """A seeded, content-defined sort key per URL: the cap keeps the smallest keys.

    Keyed on the URL (not the row position), so reordering or re-sharding the metadata files selects the
    same rows, and a different seed draws an independent sample.
    """
    prefix = f"{seed}:".encode()
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(prefix + url.encode(), digest_size=8).digest(), "big")
            for url in urls
        ],
        dtype=np.uint64,
    )
