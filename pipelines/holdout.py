"""The held-out split: which ingested images the decoder never trains on, so evaluation can use them.

A pure function of (key, fraction, seed): the latent stage skips these images (counted as `held_out` in its
manifest) and the evaluation stage reads the rule back from the latent stage's record, so both sides agree
without a list of keys travelling between them, and the split does not depend on shard layout or order.
"""

from __future__ import annotations

import hashlib


def is_held_out(key: str, fraction: float, seed: int) -> bool:
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"holdout:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64
