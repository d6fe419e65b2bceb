"""A frozen LPIPS network that never touches the network.

`lpips.LPIPS(pnet_rand=False)` asks torchvision for ImageNet trunk weights, which downloads them when they
are not cached and so fails on offline cluster nodes (docs/dependencies.md, "clean-fid and LPIPS"). Here
LPIPS is built with a random trunk (its calibrated linear heads ship inside the lpips wheel), and the ImageNet
trunk is then loaded from a local torchvision state dict file. Without that file LPIPS keeps the random trunk,
with a loud warning, and the returned module's `trunk_is_pretrained` attribute is False, so callers can label
the numbers. lpips comes with the `pipeline` extra and is imported by `load_lpips` only.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import nn

from infgen._extras import import_extra
from infgen.metrics.local_weights import find_local_weights

if TYPE_CHECKING:
    import lpips

logger = logging.getLogger(__name__)

TRUNK_ENV_VAR = "INFGEN_LPIPS_TRUNK"
WEIGHTS_URL = "https://download.pytorch.org/models/"
RANDOM_TRUNK_SEED = 0

# lpips `net` name → (torchvision constructor whose `.features` lpips slices, torchvision's weight file name)
TRUNKS = {
    "alex": (torchvision.models.alexnet, "alexnet-owt-7be5be79.pth"),
    "vgg": (torchvision.models.vgg16, "vgg16-397923af.pth"),
    "squeeze": (torchvision.models.squeezenet1_1, "squeezenet1_1-b8a52dc0.pth"),
}


def default_trunk_path(net: str = "alex") -> Path:
    """Where torchvision itself caches the trunk: $TORCH_HOME/hub/checkpoints (TORCH_HOME: ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TRUNKS[net][1]


def load_lpips(trunk_weights: str | Path | None = None, net: str = "alex") -> lpips.LPIPS:
    """A frozen, eval-mode LPIPS for inputs in [-1, 1]; `.trunk_is_pretrained` marks an ImageNet trunk.

    trunk_weights: a torchvision ImageNet state dict for the trunk (e.g. alexnet-owt-7be5be79.pth). When None,
    try $INFGEN_LPIPS_TRUNK, then default_trunk_path(net); if neither exists, keep a random trunk and warn.
    A path that is given (argument or env var) but missing raises FileNotFoundError; bad contents ValueError.
    """
    if net not in TRUNKS:
        raise ValueError(f"unknown LPIPS net {net!r}; expected one of {sorted(TRUNKS)}")
    # lpips is in the pipeline extra only; the trunk helpers above work without it.
    lpips = import_extra("lpips", "lpips", "LPIPS (infgen.metrics.perceptual.load_lpips)")
    path = _find_trunk_weights(trunk_weights, net)
    # The random trunk (when no weights are found) must be the same network in every process, or LPIPS values
    # from different Ray workers would not be comparable: build it from a fixed seed, leaving the caller's
    # RNG as it was.
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # lpips passes torchvision's deprecated `pretrained=` argument; the warning is noise, not actionable.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        torch.manual_seed(RANDOM_TRUNK_SEED)
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    if path is None:
        logger.warning(
            "LPIPS uses a RANDOM %s trunk: no ImageNet trunk weights were found (looked for $%s and %s). "
            "Its values are NOT comparable to published LPIPS numbers, and as a loss it is only a "
            "random-feature loss. Put torchvision's %s (from %s) at that path, set $%s, or pass its path.",
            net,
            TRUNK_ENV_VAR,
            default_trunk_path(net),
            TRUNKS[net][1],
            WEIGHTS_URL + TRUNKS[net][1],
            TRUNK_ENV_VAR,
        )
    else:
        _load_trunk(model.net, path, net)
    model.requires_grad_(False)  # lpips leaves its linear heads trainable; this is a fixed metric and loss
    model.eval()  # the linear heads hold dropout layers
    model.trunk_is_pretrained = path is not None
    return model


def _find_trunk_weights(trunk_weights: str | Path | None, net: str) -> Path | None:
    return find_local_weights(
        trunk_weights, TRUNK_ENV_VAR, default_trunk_path(net), "LPIPS trunk weights", FileNotFoundError
    )


def _load_trunk(trunk: nn.Module, path: Path, net: str) -> None:
    """Copy a torchvision state dict's `features` layers into lpips' `slice1..sliceN` modules.

    lpips' slices hold the torchvision `features` modules themselves, each child named by its index in
    `features` (lpips/pretrained_networks.py), so child "3" of any slice is `features[3]`.
    """
    constructor, file_name = TRUNKS[net]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(f"LPIPS trunk weights {path} cannot be read as a state dict: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"LPIPS trunk weights {path} hold a {type(state).__name__}, not a state dict")
    prefix = "features."
    features_state = {
        key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)
    }
    if not features_state:
        raise ValueError(
            f"LPIPS trunk weights {path} have no 'features.*' keys (first keys: {list(state)[:4]}); "
            f"expected a torchvision {net} ImageNet state dict such as {file_name}"
        )
    with torch.device("meta"):  # shapes only: skips initialising (and allocating) the unused classifier
        features = constructor(weights=None).features
    try:
        features.load_state_dict(features_state, strict=True, assign=True)  # take the tensors
    except RuntimeError as error:  # missing, unexpected or wrongly shaped keys
        raise ValueError(f"LPIPS trunk weights {path} do not match torchvision's {net}: {error}") from error
    for slice_module in trunk.children():
        for index, layer in slice_module.named_children():
            layer.load_state_dict(features[int(index)].state_dict())
