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


def test_the_global_batch_splits_into_equal_micro_batches_or_names_the_worker_counts_that_work():
    from jobs.options import output_defining
    from jobs.registry import COMMANDS
    from jobs.train_command import TrainOptions
    from pipelines.training.config import batch_split

    assert batch_split(32, 8) == (4, 1) and batch_split(32, 8, micro_batch_limit=2) == (2, 2)
    assert batch_split(32, 4, micro_batch_limit=3) == (2, 4)  # 8 a worker: the fewest micro batches of ≤ 3
    assert batch_split(32, 32, micro_batch_limit=1) == (1, 1) and batch_split(6, 1, 4) == (3, 2)
    with pytest.raises(ValueError, match="32 is not divisible by num_workers 3.*work: 1, 2, 4, 8, 16, 32$"):
        dataclasses.replace(STAGE1, num_workers=3)
    for bad, message in (({"micro_batch_limit": 0}, "micro_batch_limit must be ≥ 1"),
                         ({"max_failures": -2}, "max_failures must be ≥ 0, or -1"),
                         ({"num_workers": 0}, "num_workers must be ≥ 1")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(STAGE1, **bad)
    assert dataclasses.replace(STAGE1, max_failures=-1).max_failures == -1  # Ray Train: no limit
    assert STAGE1.max_failures == 3 and STAGE1_SMALL.max_failures == 1

    # DeepSpeed's batch settings follow from the config: micro × accumulation × workers = global
    limited = dataclasses.replace(STAGE1, micro_batch_limit=2).deepspeed_config()
    assert (limited["train_micro_batch_size_per_gpu"], limited["gradient_accumulation_steps"]) == (2, 2)
    assert limited["train_batch_size"] == 32 and "checkpoint" not in limited
    assert STAGE1.deepspeed_config(load_universal=True)["checkpoint"] == {"load_universal": True}

    # The worker count is a resource: a workflow's config hash leaves it out, so a change resumes the stage.
    resources = COMMANDS["train"].resource_fields()
    assert {"workers", "micro_batch_limit", "max_failures", "checkpoint_every"} <= set(resources)
    options = TrainOptions(preset="stage1", latents="L", images="I", output="O", workers=4, max_failures=5)
    assert output_defining(options, resources) == dict(preset="stage1", latents="L", images="I", output="O")


def fp32_whole(**changes):
    """fp32 ZeRO 0 on one rank, crops and windows covering the whole 64² targets: the loss is a mean over
    samples, so one batch of 2 and two micro batches of 1 give the same gradient (up to float rounding)."""
    config = STAGE1_SMALL.with_steps(4, gan_start_step=0)
    loss = dataclasses.replace(config.loss, perceptual_crop=64)
    return dataclasses.replace(config, num_workers=1, global_batch=2, train_window=None, loss=loss, **changes)


def test_gradient_accumulation_steps_once_per_global_batch_and_skips_a_bad_micro_batch_whole(one_rank):
    latents, truth = a_batch()
    whole, split = fp32_whole(), fp32_whole(micro_batch_limit=1)
    assert (whole.accumulation_steps, split.accumulation_steps, split.micro_batch) == (1, 2, 1)
    one_pass, accumulated = build_engines(whole), build_engines(split)
    for step in range(2):
        a = train_step(one_pass, whole, latents, truth, step=step, rank=0)
        b = train_step(accumulated, split, latents, truth, step=step, rank=0)
        assert a["lr"] == b["lr"]  # the schedule moves once per step, not per micro batch
        for name in ("total", "l1", "perceptual", "gan", "discriminator"):
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (step, name)
    assert accumulated.generator.global_steps == accumulated.discriminator.global_steps == 2
    for x, y in zip(accumulated.ema.parameters(), one_pass.ema.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)

    # A NaN in the second micro batch: the first one's gradients are dropped, nothing moves, and the next
    # step is exactly the step the run without the bad batch took.
    faulty = build_engines(split)
    assert train_step(faulty, split, latents, truth, step=0, rank=0) is not None
    trained = (faulty.model, faulty.loss.discriminator, faulty.ema)
    snapshot = [p.clone() for module in trained for p in module.parameters()]
    assert train_step(faulty, split, latents, truth, step=1, rank=0, hooks=NonFiniteLossAt(1, part=1)) is None
    assert all(torch.equal(a, b) for a, b in zip((p for m in trained for p in m.parameters()), snapshot))
    assert all(p.grad is None for m in (faulty.model, faulty.loss.discriminator) for p in m.parameters())
    assert faulty.generator.global_steps == 1
    assert train_step(faulty, split, latents, truth, step=1, rank=0) == b  # b: `accumulated`'s step 1
    assert same(list(faulty.model.parameters()), list(accumulated.model.parameters()))
    assert same(list(faulty.ema.parameters()), list(accumulated.ema.parameters()))
