"""Shared by the benchmarks: print the markdown report and, if asked, write it to a file."""

from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], output: str | None) -> None:
    report = "\n".join(lines)
    print(report)
    if output:
        Path(output).write_text(report + "\n")


def markdown_table(header: list[str], rows: dict[str, list[str]]) -> list[str]:
    """A markdown table: `header` cells, then one row per label (its first cell) with its cells."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    return lines + [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows.items()]
