"""Where pretrained weights come from when nothing may be downloaded: an explicit path, else an environment
variable, else the place the upstream library caches them. Shared by LPIPS and Inception."""

from __future__ import annotations

import os
from pathlib import Path


def find_local_weights(
    explicit: str | Path | None, env_var: str, default: Path, what: str, error: type[Exception]
) -> Path | None:
    """The weights file to load, or None when none is configured and the default place is empty.

    A path that is given (argument or env var) but missing raises `error`: a configured path that is wrong is
    a mistake to report, not a reason to fall back to a substitute network.
    """
    for value, origin in ((explicit, ""), (os.environ.get(env_var) or None, f" (from ${env_var})")):
        if value is not None:
            path = Path(value).expanduser()
            if not path.is_file():
                raise error(f"{what} {path}{origin} do not exist (or are not a file)")
            return path
    return default if default.is_file() else None
