"""Faults the training tests inject: objects passed as `hooks` to run_training / train_step (never part of a
training config). Pickled by value, so Ray Train's workers, which cannot import the tests folder, get them."""

from __future__ import annotations

import sys
from pathlib import Path

import ray.cloudpickle


class FailOnceAt:
    """Raise once at `step` (a marker file in the run's folder remembers it): Ray Train then restarts the
    workers from the last checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def before_step(self, step: int, rank: int, run_dir: str) -> None:
        marker = Path(run_dir) / "injected_failure"
        if step != self.step or marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        raise RuntimeError(f"injected failure at step {step}")

    def loss(self, total, step: int, rank: int):
        return total


class NonFiniteLossAt:
    """The loss of micro batch `part` (0: rank 0's first) is NaN at `step`, the others' are not: the hard
    case for the skip."""

    def __init__(self, step: int, part: int = 0):
        self.step, self.part = step, part

    def before_step(self, step: int, rank: int, run_dir: str) -> None:
        pass

    def loss(self, total, step: int, part: int):
        return total * float("nan") if step == self.step and part == self.part else total


class RecordStart:
    """No fault: rank 0 saves what the engines hold before the first step (RUN/started.pt), so a test can
    compare it with what the run started from."""

    def before_step(self, step: int, rank: int, run_dir: str) -> None:
        pass

    def loss(self, total, step: int, rank: int):
        return total

    def started(self, parts, rank: int, run_dir: str) -> None:
        import torch

        if rank != 0:
            return
        state = {
            "decoder": parts.model.state_dict(),
            "ema": parts.ema.state_dict(),
            "discriminator": parts.discriminator.module.state_dict(),
            "discriminator_optimizer": parts.discriminator.optimizer.state_dict(),
            "generator_optimizer": parts.generator.optimizer.state_dict(),
            "lr": parts.scheduler.get_last_lr()[0],
        }
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(run_dir) / "started.pt")


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
