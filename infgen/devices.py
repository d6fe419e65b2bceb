"""Where a module and its inputs live. Every stage picks its device the same way (`default_device`), and code
that feeds tensors built on the host to a module checks them against the module's device
(`assert_same_device`), so a mismatch is one line naming both devices instead of a kernel error deep inside
the module (the evaluation once fed CPU tensors to LPIPS on CUDA)."""

from __future__ import annotations

import torch
from torch import nn


def default_device() -> str:
    """ "cuda" where this process sees a GPU (Ray sets CUDA_VISIBLE_DEVICES from a task's num_gpus), else
    "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def module_device(module: nn.Module) -> torch.device:
    """The one device of a module's parameters and buffers; ValueError when they are spread over several."""
    devices = {tensor.device for tensor in (*module.parameters(), *module.buffers())}
    if len(devices) != 1:
        found = ", ".join(sorted(str(device) for device in devices)) or "none (no parameters or buffers)"
        raise ValueError(f"{type(module).__name__}: expected its weights on one device, found {found}")
    return devices.pop()


def assert_same_device(module: nn.Module, *tensors: torch.Tensor) -> torch.device:
    """The module's device, after checking that every tensor is on it; ValueError naming both otherwise."""
    device = module_device(module)
    for index, tensor in enumerate(tensors):
        if tensor.device != device:
            raise ValueError(f"{type(module).__name__} is on {device} but its input {index} is on "
                             f"{tensor.device}: move inputs to the module's device first")  # fmt: skip
    return device
