"""Selection: metadata Parquet → the rows to download, with a reason for every row left out.

Three steps, each a pure function without Ray; `pipelines/ingest/stage.py` runs the per-unit ones as one
Ray task per `WorkUnit`:

1. `classify_unit`  one work unit (whole row groups of one metadata file) → a count per reason for the rows
                    left out, and the rows that pass every filter and the address guard as `Candidates`
                    (compact numeric ids).
2. `choose`         on the driver, over the compact ids only (32 bytes a row): drop duplicate URLs (the first
                    occurrence by file and row wins), then cap to the target count by the seeded hash order.
3. `write_unit_selection`  one unit again → `part-FFFFF-UUUUU.parquet` with the chosen rows in source order.

Keys downstream are positions in the sorted part files, so the same inputs and config give the same keys.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.ingest.address_guard import AddressGuard
from pipelines.ingest.filters import FilterConfig, first_failed_rule, selection_order

PASSED = ""  # the reason of a row that passes every filter


@dataclass(frozen=True)
class WorkUnit:
    """Whole row groups of one metadata file: what one selection task reads."""

    file_index: int  # the file's position among the inputs
    unit_index: int  # the unit's position among all units; with file_index, it names the unit's part file
    path: str
    first_row: int  # the file's row number of the unit's first row
    rows: int
    row_groups: tuple[int, ...]


@dataclass(frozen=True)
class Candidates:
    """The rows that pass every filter and the address guard, as compact ids (32 bytes a row), so the driver
    deduplicates and caps millions of rows without holding a URL. Equal-length arrays, one entry a row."""

    file_index: np.ndarray  # int64
    row: np.ndarray  # int64: the row's number in its file
    order: np.ndarray  # uint64: the seeded sort key (`selection_order`); the cap keeps the smallest
    digest: np.ndarray  # (n, 2) uint64: the URL's 128-bit digest, which deduplication compares

    def __len__(self) -> int:
        return len(self.row)

    @classmethod
    def empty(cls) -> Candidates:
        return cls(
            file_index=np.zeros(0, np.int64),
            row=np.zeros(0, np.int64),
            order=np.zeros(0, np.uint64),
            digest=np.zeros((0, 2), np.uint64),
        )

    @classmethod
    def concatenate(cls, parts: list[Candidates]) -> Candidates:
        parts = [cls.empty(), *parts]  # so that no units still give well-typed (empty) arrays
        return cls(
            file_index=np.concatenate([part.file_index for part in parts]),
            row=np.concatenate([part.row for part in parts]),
            order=np.concatenate([part.order for part in parts]),
            digest=np.concatenate([part.digest for part in parts]),
        )


def metadata_columns(config: FilterConfig, schema: pa.Schema, path: str) -> list[str]:
    """The configured columns present in a file; a missing required column is an error naming the file."""
    columns = config.columns
    required = [columns.url, columns.width, columns.height, columns.aesthetic, columns.punsafe]
    required.append(columns.pwatermark)
    missing = [name for name in required if name not in schema.names]
    if missing:
        raise ValueError(
            f"metadata file {path} lacks column(s) {missing} (it has {schema.names}); "
            "map the release's column names with the filters.columns config"
        )
    optional = [columns.caption, columns.similarity, columns.hash]
    return required + [name for name in optional if name in schema.names]


def open_parquet(path: str) -> pq.ParquetFile:
    filesystem, local_path = fsspec.core.url_to_fs(path)
    try:
        return pq.ParquetFile(filesystem.open(local_path, "rb"))
    except FileNotFoundError:
        raise FileNotFoundError(f"metadata file {path} does not exist") from None
    except pa.ArrowInvalid as error:
        raise ValueError(f"metadata file {path} is not a Parquet file: {error}") from None


def plan_units(paths: list[str], rows_per_unit: int) -> list[WorkUnit]:
    """Split the metadata files into work units of whole row groups (≈ rows_per_unit rows each)."""
    units: list[WorkUnit] = []
    for file_index, path in enumerate(paths):
        metadata = open_parquet(path).metadata
        groups, first_row, rows = [], 0, 0
        for index in range(metadata.num_row_groups):
            groups.append(index)
            rows += metadata.row_group(index).num_rows
            if rows >= rows_per_unit or index == metadata.num_row_groups - 1:
                units.append(WorkUnit(file_index, len(units), path, first_row, rows, tuple(groups)))
                groups, first_row, rows = [], first_row + rows, 0
    return units


def read_unit(unit: WorkUnit, config: FilterConfig) -> pd.DataFrame:
    parquet = open_parquet(unit.path)
    columns = metadata_columns(config, parquet.schema_arrow, unit.path)
    if not unit.row_groups:
        return pd.DataFrame(columns=columns)
    return parquet.read_row_groups(list(unit.row_groups), columns=columns).to_pandas()


@lru_cache(maxsize=8)
def _guard(allow_hosts: tuple[str, ...]) -> AddressGuard:
    # One guard per worker process, so host decisions (and DNS answers) are cached across units.
    return AddressGuard(allow_hosts)


def url_digests(urls: pd.Series) -> np.ndarray:
    """(n, 2) uint64: a 128-bit digest per URL, so deduplication needs no strings on the driver."""
    digests = b"".join(hashlib.blake2b(url.encode(), digest_size=16).digest() for url in urls)
    return np.frombuffer(digests, dtype=">u8").reshape(-1, 2).astype(np.uint64)


def classify_unit(
    unit: WorkUnit, config: FilterConfig, allow_hosts: tuple[str, ...]
) -> tuple[dict[str, int], Candidates]:
    """One unit's rows: a count per reason for the rows left out, and the rows that pass as candidates."""
    frame = read_unit(unit, config)
    reasons = first_failed_rule(frame, config)
    urls = frame[config.columns.url].astype(object)
    passing = np.flatnonzero(reasons == PASSED)
    guard = _guard(tuple(allow_hosts))
    for index in passing:
        problem = guard(urls.iat[index].strip())
        if problem:
            reasons[index] = f"refused_{problem}"
    passing = np.flatnonzero(reasons == PASSED)
    clean_urls = urls.iloc[passing].str.strip()
    counts = Counter(reasons[reasons != PASSED].tolist())
    candidates = Candidates(
        file_index=np.full(len(passing), unit.file_index, dtype=np.int64),
        row=unit.first_row + passing.astype(np.int64),
        order=selection_order(clean_urls, config.seed),
        digest=url_digests(clean_urls),
    )
    return dict(counts), candidates


def choose(candidates: Candidates, target_count: int | None) -> tuple[np.ndarray, dict[str, int]]:
    """Deduplicate and cap. Returns (a boolean mask over the candidates: chosen, counts {"duplicate_url": n,
    "over_cap": n})."""
    count = len(candidates)
    if count == 0:
        return np.zeros(0, dtype=bool), {"duplicate_url": 0, "over_cap": 0}
    digest, file_index, row = candidates.digest, candidates.file_index, candidates.row
    # First occurrence (by file, then row) of each URL survives: sort by digest, then position.
    by_digest = np.lexsort((row, file_index, digest[:, 1], digest[:, 0]))
    sorted_digest = digest[by_digest]
    first = np.ones(count, dtype=bool)
    first[1:] = np.any(sorted_digest[1:] != sorted_digest[:-1], axis=1)
    unique = np.zeros(count, dtype=bool)
    unique[by_digest[first]] = True
    duplicates = count - int(unique.sum())
    chosen = unique.copy()
    if target_count is not None and unique.sum() > target_count:
        survivors = np.flatnonzero(unique)
        # The smallest seeded hashes win; the digest breaks (astronomically unlikely) ties.
        order = np.lexsort((digest[survivors, 1], digest[survivors, 0], candidates.order[survivors]))
        chosen[:] = False
        chosen[survivors[order[:target_count]]] = True
    over_cap = int(unique.sum() - chosen.sum())
    return chosen, {"duplicate_url": duplicates, "over_cap": over_cap}


def chosen_rows_by_unit(
    units: list[WorkUnit], candidates: Candidates, chosen: np.ndarray
) -> list[tuple[WorkUnit, np.ndarray]]:
    """Each unit that holds chosen rows, with their row numbers in ascending order (its part file's order)."""
    file_index, row = candidates.file_index[chosen], candidates.row[chosen]
    by_unit = []
    for unit in units:
        mine = (file_index == unit.file_index) & (row >= unit.first_row) & (row < unit.first_row + unit.rows)
        if mine.any():
            by_unit.append((unit, np.sort(row[mine])))
    return by_unit


def part_name(unit: WorkUnit) -> str:
    return f"part-{unit.file_index:05d}-{unit.unit_index:05d}.parquet"


def write_unit_selection(unit: WorkUnit, rows: np.ndarray, config: FilterConfig, directory: str) -> str:
    """Write one unit's chosen rows (row numbers in its file, ascending) with their source position; returns
    the part file's name."""
    frame = read_unit(unit, config)
    local = np.asarray(rows, dtype=np.int64) - unit.first_row
    chosen = frame.iloc[local].reset_index(drop=True)
    chosen[config.columns.url] = chosen[config.columns.url].str.strip()
    chosen["source_file"] = unit.file_index
    chosen["source_row"] = np.asarray(rows, dtype=np.int64)
    filesystem, root = fsspec.core.url_to_fs(directory)
    path = f"{root}/{part_name(unit)}"
    with filesystem.open(path + ".tmp", "wb") as handle:
        pq.write_table(pa.Table.from_pandas(chosen, preserve_index=False), handle)
    filesystem.mv(path + ".tmp", path)  # a part file exists only when complete
    return part_name(unit)


def selection_digest(urls: list[str]) -> str:
    """sha256 of the ordered URL list: the same digest means the same downloads under the same keys."""
    digest = hashlib.sha256()
    for url in urls:
        digest.update(url.encode() + b"\n")
    return digest.hexdigest()
