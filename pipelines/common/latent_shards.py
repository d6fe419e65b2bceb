"""The latent shard format, LATENTS/NNNNN.parquet: written by the latent stage, read by training (samples)
and by evaluation (our own shards as a latent source).

One row per sample. The ground truth is not stored: it is the crop box of the source image (same key, same
shard name under the ingest's images/) resized to the target size, which training rebuilds with
`pipelines.common.crops.crop_pair` instead of storing terabytes of targets.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

SAMPLE_COLUMNS = [
    ("key", pa.string()),
    ("sample_index", pa.int32()),
    ("seed", pa.int64()),
    ("crop_top", pa.int32()),
    ("crop_left", pa.int32()),
    ("crop_height", pa.int32()),
    ("crop_width", pa.int32()),
    ("target_height", pa.int32()),
    ("target_width", pa.int32()),
    ("scaling_factor", pa.float32()),
    ("shift_factor", pa.float32()),
]


def latent_schema(shape: tuple[int, int, int], vae_source: str) -> pa.Schema:
    """Flat float32 latents (C·h·w per row, C-order), with the shape and the VAE in the schema metadata."""
    fields = [pa.field(name, kind, nullable=False) for name, kind in SAMPLE_COLUMNS]
    fields.append(pa.field("latent", pa.list_(pa.float32(), int(np.prod(shape))), nullable=False))
    metadata = {"latent_shape": json.dumps(list(shape)), "vae": vae_source}
    return pa.schema(fields, metadata=metadata)


def is_latent_shard(schema: pa.Schema) -> bool:
    return bool(schema.metadata) and b"latent_shape" in schema.metadata


def latent_shape(schema: pa.Schema) -> tuple[int, int, int]:
    return tuple(json.loads(schema.metadata[b"latent_shape"]))


def read_latents(table: pa.Table) -> np.ndarray:
    """(rows, C, h, w) float32 from a latent shard table."""
    flat = table.column("latent").combine_chunks().flatten().to_numpy()
    return flat.reshape(len(table), *latent_shape(table.schema))
