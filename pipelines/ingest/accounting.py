"""Accounting: every metadata row ends in exactly one bucket, and the buckets must add up.

Buckets, in the order a row meets them:
    filtered.<rule>          failed a metadata filter (pipelines/ingest/filters.py RULES order)
    refused.<reason>         its host is or resolves to a loopback/private/link-local/metadata address
    duplicate_url            a later row with an URL already seen
    over_cap                 passed everything but lost the seeded draw for the target count
    download_failed.<reason> img2dataset could not fetch it (404, timeout, opt-out, ...)
    verification_failed.<reason>  fetched, but not a decodable image over the pixel threshold
    kept
"""

from __future__ import annotations

import re

from pipelines.common.errors import StageError

# img2dataset keeps urllib's message as error_message; these patterns give stable, countable reasons.
_FAILURE_PATTERNS = [
    (re.compile(r"HTTP Error (\d{3})"), lambda match: f"http_{match.group(1)}"),
    (re.compile(r"timed out|timeout", re.IGNORECASE), lambda match: "timeout"),
    (re.compile(r"X-Robots-Tag", re.IGNORECASE), lambda match: "opted_out"),
    (re.compile(r"refused by the address guard: (\w+)"), lambda match: f"refused_{match.group(1)}"),
    (re.compile(r"Name or service not known|nodename|getaddrinfo", re.IGNORECASE), lambda match: "dns"),
    (
        re.compile(r"Connection refused|reset by peer|Remote end closed", re.IGNORECASE),
        lambda m: "connection",
    ),
    (re.compile(r"IncompleteRead|incomplete", re.IGNORECASE), lambda match: "incomplete_body"),
]


def download_failure_reason(message: str | None) -> str:
    for pattern, name in _FAILURE_PATTERNS:
        match = pattern.search(message or "")
        if match:
            return name(match)
    return "other"


class AccountingError(StageError):
    """The buckets do not add up to the input rows: some row was lost or counted twice."""


def bucket_totals(counts: dict) -> int:
    total = 0
    for value in counts.values():
        total += bucket_totals(value) if isinstance(value, dict) else int(value)
    return total


def build_counts(
    input_rows: int,
    selection_counts: dict[str, int],
    duplicate_url: int,
    over_cap: int,
    rejects: dict[tuple[str, str], int],
    kept: int,
) -> dict:
    """Nest the flat counts into the manifest's buckets (see the module docstring)."""
    filtered = {k: v for k, v in selection_counts.items() if not k.startswith("refused_")}
    refused = {k.removeprefix("refused_"): v for k, v in selection_counts.items() if k.startswith("refused_")}
    download = {reason: n for (stage, reason), n in rejects.items() if stage == "download"}
    verification = {reason: n for (stage, reason), n in rejects.items() if stage == "verification"}
    buckets = {
        "filtered": dict(sorted(filtered.items())),
        "refused": dict(sorted(refused.items())),
        "duplicate_url": duplicate_url,
        "over_cap": over_cap,
        "download_failed": dict(sorted(download.items())),
        "verification_failed": dict(sorted(verification.items())),
        "kept": kept,
    }
    return {"input_rows": input_rows, "buckets": buckets}


def check_counts(counts: dict) -> None:
    accounted = bucket_totals(counts["buckets"])
    if accounted != counts["input_rows"]:
        raise AccountingError(
            f"ingest accounting does not add up: {counts['input_rows']} input rows but {accounted} in "
            f"buckets ({counts['buckets']}); the manifest was written with status 'unbalanced' for inspection"
        )
