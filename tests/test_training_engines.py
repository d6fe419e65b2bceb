"""The training loop's engines and step without Ray (`build_engines`, `train_step`: what bench/train.py's
in-process mode runs on a GPU): one gloo rank, with the GPU presets' bf16 and ZeRO stage 1, on CPU."""

import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist
from training_faults import NonFiniteLossAt

from pipelines.training.config import STAGE1, STAGE1_SMALL
from pipelines.training.loop import build_engines, train_step


@pytest.fixture
def one_rank(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    environment = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    for name, value in {**environment, "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", init_method="env://")
    yield
    dist.destroy_process_group()


def test_engines_train_a_bf16_zero1_step_and_skip_a_nan_one(one_rank):
    config = dataclasses.replace(
        STAGE1_SMALL, num_workers=1, global_batch=2, precision="bf16", zero_stage=STAGE1.zero_stage,
        activation_checkpointing=True, steps=4,
    ).with_gan_start(0)  # fmt: skip
    parts = build_engines(config)
    assert next(parts.model.parameters()).dtype == torch.bfloat16  # DeepSpeed cast the decoder in place
    assert next(parts.ema.parameters()).dtype == torch.float32
    assert next(parts.ema.parameters()).device == parts.generator.device
    assert next(parts.loss.perceptual.parameters()).device == parts.generator.device
    latents, truth = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64) * 2 - 1

    ema_before = [p.clone() for p in parts.ema.parameters()]
    metrics = train_step(parts, config, latents, truth, step=0, rank=0)
    assert {"total", "l1", "perceptual", "gan", "discriminator", "lr"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(parts.ema.parameters(), ema_before))

    # A non-finite loss: no update of the decoder, the discriminator or the EMA.
    trained = (parts.model, parts.loss.discriminator, parts.ema)
    snapshot = [p.clone() for module in trained for p in module.parameters()]
    assert train_step(parts, config, latents, truth, step=1, rank=0, hooks=NonFiniteLossAt(1)) is None
    after = [p for module in trained for p in module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, snapshot))
