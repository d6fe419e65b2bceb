"""Self-describing decoder checkpoints: `model.safetensors` + `config.json` in one directory.

safetensors holds tensors only, and the JSON sidecar holds the InfGenConfig plus free-form metadata (step,
stage, data manifest). Loading never unpickles, so a checkpoint from an untrusted run cannot execute code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from infgen.model import InfGen, InfGenConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


def save(model: InfGen, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write weights and config to `directory` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # contiguous clones: safetensors refuses views and shared storage
    state = {
        name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model.state_dict().items()
    }
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    sidecar = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(), "metadata": metadata or {}}
    # Written last: a directory with config.json is complete even if a crash hit mid-save.
    (directory / CONFIG_NAME).write_text(json.dumps(sidecar, indent=2, sort_keys=True))
    return directory


def read_metadata(path: str | Path) -> dict:
    return _read_sidecar(_checkpoint_dir(path))["metadata"]


def read_config(path: str | Path) -> InfGenConfig:
    """The checkpoint's InfGenConfig, without loading its weights."""
    return InfGenConfig.from_dict(_read_sidecar(_checkpoint_dir(path))["config"])


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> InfGen:
    """Return a ready (eval-mode) InfGen from a checkpoint directory or its model.safetensors file."""
    directory = _checkpoint_dir(path)
    sidecar = _read_sidecar(directory)
    model = InfGen(InfGenConfig.from_dict(sidecar["config"]))
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    state = load_file(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {weights} does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval()


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    directory = path.parent if path.name == WEIGHTS_NAME else path
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} is not an InfGen checkpoint: no {CONFIG_NAME} in {directory}")
    return directory


def _read_sidecar(directory: Path) -> dict:
    sidecar = json.loads((directory / CONFIG_NAME).read_text())
    version = sidecar.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_NAME} has format_version {version}, expected {FORMAT_VERSION}")
    return sidecar
