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


@pytest.fixture(scope="module")
def one_rank():
    # One process group for the module: DeepSpeed keeps a clone of the world group (deepspeed.utils.groups)
    # across engines, which a destroyed and re-created group would leave dangling.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    environment = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**environment, "DS_ACCELERATOR": "cpu"}.items():
            patch.setenv(name, value)
        dist.init_process_group("gloo", init_method="env://")
        yield
        dist.destroy_process_group()


def test_engines_train_a_bf16_zero1_step_and_skip_a_nan_one(one_rank):
    config = dataclasses.replace(
        STAGE1_SMALL.with_steps(4, gan_start_step=0), num_workers=1, global_batch=2, precision="bf16",
        zero_stage=STAGE1.zero_stage, activation_checkpointing=True,
    )  # fmt: skip
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


def bf16_zero1(**optimizer_changes):
    """The GPU presets' precision and ZeRO stage at CPU scale, on one rank, the GAN from step 0."""
    optimizer = dataclasses.replace(STAGE1_SMALL.optimizer, **optimizer_changes)
    return dataclasses.replace(
        STAGE1_SMALL.with_steps(4, gan_start_step=0), num_workers=1, global_batch=2, precision="bf16",
        zero_stage=STAGE1.zero_stage, activation_checkpointing=True, optimizer=optimizer,
    )  # fmt: skip


def a_batch():
    return torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64) * 2 - 1


def test_the_ema_follows_the_fp32_master_weights_not_the_bf16_module(one_rank):
    from deepspeed.utils import safe_get_full_fp32_param

    config = bf16_zero1()
    parts = build_engines(config)
    latents, truth = a_batch()
    train_step(parts, config, latents, truth, step=0, rank=0)  # masters and their bf16 copies now differ
    before = [p.clone() for p in parts.ema.parameters()]
    train_step(parts, config, latents, truth, step=1, rank=0)
    masters = [safe_get_full_fp32_param(p) for p in parts.model.parameters()]
    rounded = [p.detach().float() for p in parts.model.parameters()]
    assert any(not torch.equal(m, r) for m, r in zip(masters, rounded))  # the test can tell them apart
    weight = 1 - config.ema_decay
    from_masters = [b.lerp(m, weight) for b, m in zip(before, masters)]
    from_rounded = [b.lerp(r, weight) for b, r in zip(before, rounded)]
    for average, expected in zip(parts.ema.parameters(), from_masters):
        torch.testing.assert_close(average, expected, rtol=0, atol=1e-7)
    gap = max((a - e).abs().max().item() for a, e in zip(parts.ema.parameters(), from_rounded))
    assert gap > 1e-6  # the old EMA (of the bf16 module weights) would have been this far off


def test_bf16_without_zero_is_refused_naming_the_reason():
    config = dataclasses.replace(bf16_zero1(), zero_stage=0)
    with pytest.raises(ValueError, match="bf16 needs zero_stage ≥ 1, got 0.*fp32 master weights"):
        build_engines(config)


def trained_state(parts) -> dict[str, list[torch.Tensor]]:
    """Everything a continued run must carry: weights, fp32 masters (DeepSpeed's public accessor), and the
    torch AdamW state under DeepSpeed's wrapper (moments and step counts of its flat fp32 partitions)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {"ema": [p.clone() for p in parts.ema.parameters()]}
    for name, module in (("generator", parts.model), ("discriminator", parts.loss.discriminator)):
        parameters = list(module.parameters())
        state[f"{name} weights"] = [p.detach().clone() for p in parameters]
        state[f"{name} masters"] = [safe_get_full_fp32_param(p).clone() for p in parameters]
        adam = list(getattr(parts, name).basic_optimizer.state.values())
        for key in ("exp_avg", "exp_avg_sq", "step"):
            state[f"{name} {key}"] = [values[key].clone() for values in adam]
    return state


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_continued_run_starts_from_the_checkpoints_state_with_its_own_hyperparameters(one_rank, tmp_path):
    from pipelines.training.loop import continue_training_state

    first_config = bf16_zero1()
    first = build_engines(first_config)
    latents, truth = a_batch()
    for step in range(2):
        assert train_step(first, first_config, latents, truth, step=step, rank=0) is not None
    # what a Ray Train checkpoint of the loop holds (pipelines/training/loop.py, _checkpoint)
    first.generator.save_checkpoint(str(tmp_path / "generator"), tag="step2")
    first.discriminator.save_checkpoint(str(tmp_path / "discriminator"), tag="step2")
    torch.save({"ema": first.ema.state_dict(), "step": 2}, tmp_path / "trainer_state.pt")
    carried = trained_state(first)

    # the next stage: another peak LR, discriminator LR and warm-up
    config = bf16_zero1(peak_lr=5e-4, discriminator_lr=3e-4, warmup_steps=3)
    second = build_engines(config, continued=True)
    fresh = trained_state(second)  # AdamW's state does not exist before a first step
    assert all(not same(fresh[key], carried[key]) for key in carried), "a fresh start must differ"
    assert continue_training_state(second, str(tmp_path)) == 2
    loaded = trained_state(second)
    for key, tensors in carried.items():
        assert same(loaded[key], tensors), key

    # this stage's hyperparameters, and an LR that starts at the peak rather than a fresh warm-up's first step
    assert second.scheduler.get_last_lr() == [5e-4, 5e-4]
    assert [group["lr"] for group in second.generator.optimizer.param_groups] == [5e-4, 5e-4]
    assert [group["weight_decay"] for group in second.generator.optimizer.param_groups] == [0.01, 0.0]
    assert [group["lr"] for group in second.discriminator.optimizer.param_groups] == [3e-4]
    assert build_engines(config).scheduler.get_last_lr()[0] == pytest.approx(5e-4 / 3)
    metrics = train_step(second, config, latents, truth, step=0, rank=0)
    assert metrics["lr"] == 5e-4 and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
