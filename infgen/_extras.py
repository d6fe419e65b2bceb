"""Imports of packages from the `pipeline` extra, failing with an error that says how to install them.

`pip install infgen` brings only torch, torchvision, safetensors, numpy and pillow: enough to build, save,
load and run the decoder. The features that need more (a diffusers VAE, LPIPS, clean-fid's Inception, scipy's
matrix square root) import their package when first used, through `import_extra`, so `import infgen` and
the decoder work without them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'infgen[pipeline]'"


def import_extra(module: str, package: str, feature: str) -> ModuleType:
    """Import `module` (from the distribution `package`), or raise ImportError naming `package` and the fix.

    Only the absence of `module` itself (or of a parent package) is translated; an installed package that
    fails to import for another reason, such as a missing dependency of its own, raises its own error.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module != missing and not module.startswith(missing + "."):
            raise
        raise ImportError(
            f"{feature} needs {package}, which is not installed; it comes with the pipeline extra: "
            f"{INSTALL_HINT}"
        ) from error
