"""Shared by the benchmarks: print the markdown report and, if asked, write it to a file."""

from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], output: str | None) -> None:
    report = "\n".join(lines)
    print(report)
    if output:
        Path(output).write_text(report + "\n")
