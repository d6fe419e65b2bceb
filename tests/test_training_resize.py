"""A training run resumed on another worker count (issue 14, item 1): 2 CPU workers with ZeRO 1 write a
checkpoint and fail, the rerun on 1 worker resumes from that checkpoint (DeepSpeed's partitioned optimizer
state re-sharded through a universal checkpoint) and goes on as the uninterrupted 2-worker run does."""

import dataclasses
import json

import pytest
import torch
from training_faults import FailOnceAt, RecordStart

from pipelines.common.tracking import StageTracking
from pipelines.training.config import STAGE1_SMALL
from pipelines.training.stage import run_training

# ZeRO 1 partitions the optimizer state over the workers (the GPU presets' stage), in fp32 so that the runs
# can be compared closely; crops and no training window cover whole targets, so every step's loss is a mean
# over the same global batch whatever the worker count, and only the order of float sums differs.
CONFIG = dataclasses.replace(
    STAGE1_SMALL.with_steps(8, gan_start_step=2), zero_stage=1, checkpoint_every=4, train_window=None,
    loss=dataclasses.replace(STAGE1_SMALL.loss, gan_start_step=2, perceptual_crop=128),
)  # fmt: skip


def losses(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def unpadded(files: list, key: str, group: int) -> torch.Tensor:
    """One optimizer group's flat tensor `key` from the ranks' ZeRO partition files, in rank order, without
    the alignment padding at its end."""
    parts, padding = [], 0
    for state in files:
        if key == "fp32":
            parts.append(state["single_partition_of_fp32_groups"][group])
        else:
            parts.append(state["base_optimizer_state"]["state"][group][key])
        padding = state["group_paddings"][group]  # the last rank's
    flat = torch.cat(parts)
    return flat[: flat.numel() - padding]


@pytest.mark.slow
def test_a_run_resumes_on_another_worker_count_with_its_optimizer_state(embedded_latents, tmp_path):
    latents, images = str(embedded_latents["latents"]), str(embedded_latents["images"])
    tracking = StageTracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    reference = tmp_path / "reference"
    run_training(CONFIG, latents, images, str(reference), tracking)

    resized = tmp_path / "resized"
    with pytest.raises(Exception, match="injected failure at step 5"):  # no retries: the run stops
        run_training(dataclasses.replace(CONFIG, max_failures=0), latents, images, str(resized), tracking,
                     hooks=FailOnceAt(5))  # fmt: skip
    one_worker = dataclasses.replace(CONFIG, num_workers=1)  # a resource field: the output is claimed again
    manifest = run_training(one_worker, latents, images, str(resized), tracking, hooks=RecordStart())
    assert manifest["config"]["num_workers"] == 1

    # It resumed at the step-4 checkpoint: steps 0-3 ran once (on 2 workers), step 4 twice.
    logged = losses(resized / "losses.jsonl")
    assert [record["step"] for record in logged] == [0, 1, 2, 3, 4, 4, 5, 6, 7]
    # The engines started from that checkpoint's state, re-sharded: the fp32 master weights and the Adam
    # moments and step counts of both engines are the 2 workers' partitions, put together.
    (checkpoint,) = [path.parent for path in resized.glob("checkpoint_*/trainer_state.pt")
                     if torch.load(path, weights_only=True)["step"] == 4]  # fmt: skip
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=True)["workers"] == 2
    started = torch.load(resized / "started.pt", weights_only=False)
    for engine in ("generator", "discriminator"):
        files = [torch.load(checkpoint / engine / "step4" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                            weights_only=False)["optimizer_state_dict"] for rank in range(2)]  # fmt: skip
        loaded = [started[f"{engine}_optimizer"]]
        for group in range(len(files[0]["group_paddings"])):
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                saved = unpadded(files, key, group)
                assert torch.equal(unpadded(loaded, key, group)[: saved.numel()], saved), (engine, group, key)
                assert key == "fp32" or saved.abs().sum() > 0  # moments of a trained engine, not fresh zeros
            steps = {float(loaded[0]["base_optimizer_state"]["state"][group]["step"])}
            assert steps == {2.0 if engine == "discriminator" else 4.0}  # its steps so far (D from step 2)

    # From the checkpoint on it trains as the 2-worker run did: the same global batches and gradients, up
    # to the order of float sums (relative gaps ≤ 6e-7 measured; a reset Adam state would change them by far
    # more: its first update is a full ±lr step on every weight).
    uninterrupted = {record["step"]: record for record in losses(reference / "losses.jsonl")}
    for record in logged[5:]:
        for name in ("total", "l1", "perceptual", "gan", "discriminator", "lr"):
            expected = uninterrupted[record["step"]][name]
            assert record[name] == pytest.approx(expected, rel=1e-4, abs=1e-6), (record["step"], name)
