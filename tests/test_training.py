"""Training on Ray Train with two DeepSpeed engines (2 CPU workers, gloo, fp32): both small stages, MLflow,
and a run that fails mid-way and resumes to the same losses, step for step, as the uninterrupted run."""

import dataclasses
import json
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from training_faults import FailOnceAt, NonFiniteLossAt, RecordStart

import infgen
from pipelines.common.latent_record import read_latent_record
from pipelines.common.tracking import StageTracking
from pipelines.training.config import STAGE1_SMALL, STAGE2_SMALL, TrainConfig
from pipelines.training.continuation import check_compatible, check_decoder_folder, find_continuation
from pipelines.training.data import LatentBatches
from pipelines.training.stage import model_config, run_training


def losses_by_step(path):
    """The last logged value of each step (a resumed run logs its replayed steps again)."""
    by_step = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return by_step


@pytest.fixture
def stage1(stage1_small):
    return stage1_small


def test_ctrl_c_is_the_callers_again_after_training(stage1):
    before, after = stage1["sigint_handlers"]  # Ray Train's fit installs its own and leaves it
    assert after is before


def test_config_generates_the_deepspeed_json():
    config = STAGE1_SMALL.deepspeed_config()
    assert config["train_batch_size"] == 4 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["bf16"] == {"enabled": False} and config["optimizer"]["params"]["torch_adam"] is True
    assert TrainConfig().deepspeed_config()["bf16"] == {"enabled": True}
    assert TrainConfig.from_dict(json.loads(json.dumps(STAGE2_SMALL.to_dict()))) == STAGE2_SMALL
    with pytest.raises(ValueError, match="not divisible"):
        dataclasses.replace(STAGE1_SMALL, global_batch=5)


def test_training_windows_lie_inside_large_targets_and_follow_the_seed():
    from pipelines.training.loop import training_window

    def window(size, side, seed=0):
        return training_window(size, side, torch.Generator().manual_seed(seed))

    assert window((128, 96), 128) is None and window((512, 512), None) is None  # small or off: whole target
    windows = {window((256, 384), 128, seed) for seed in range(20)}
    for top, left, height, width in windows:
        assert (height, width) == (128, 128) and 0 <= top <= 128 and 0 <= left <= 256
    assert len(windows) > 10 and window((256, 384), 128, 3) == window((256, 384), 128, 3)
    assert window((512, 64), 128)[2:] == (128, 64)  # a narrow side stays whole
    with pytest.raises(ValueError, match="train_window"):
        dataclasses.replace(STAGE1_SMALL, train_window=4)


def test_a_stage_can_train_on_the_smaller_targets_of_shared_latents(embedded_latents):
    latents, images = str(embedded_latents["latents"]), str(embedded_latents["images"])
    everything = LatentBatches(latents, images, 4, seed=0)
    small = LatentBatches(latents, images, 4, seed=0, max_target_side=96)
    sizes = {ref.target for refs in small.by_shard.values() for ref in refs}
    assert sizes and max(map(max, sizes)) <= 96
    assert small.per_epoch < everything.per_epoch
    with pytest.raises(ValueError, match="with sides ≤ 32"):
        LatentBatches(latents, images, 4, seed=0, max_target_side=32)


def test_batches_are_bucketed_and_a_pure_function_of_the_step(embedded_latents):
    data = LatentBatches(str(embedded_latents["latents"]), str(embedded_latents["images"]), 4, seed=0)
    again = LatentBatches(str(embedded_latents["latents"]), str(embedded_latents["images"]), 4, seed=0)
    for index in (0, 3, 50):
        latents, truth = data.batch(index, rank=1, world_size=2)
        assert latents.shape == (2, 4, 8, 8) and truth.shape[:2] == (2, 3)
        assert len({ref.target for ref in data.global_batch_refs(index)}) == 1  # one target size per batch
        other_latents, other_truth = again.batch(index, rank=1, world_size=2)
        assert torch.equal(latents, other_latents) and torch.equal(truth, other_truth)


def test_an_epoch_uses_each_sample_once_and_reads_each_shard_about_once(embedded_latents):
    data = LatentBatches(str(embedded_latents["latents"]), str(embedded_latents["images"]), 4, seed=0,
                         cache_shards=2)  # fmt: skip
    samples = sum(len(refs) for refs in data.by_shard.values())
    for number in range(3):
        batches = data.epoch(number)
        used = [ref for batch in batches for ref in batch]
        assert len(batches) == data.per_epoch and len(used) == len(set(used)) > samples - 4 * 20
        assert all(len({ref.target for ref in batch}) == 1 for batch in batches)
    loads, cache = 0, []  # the shard cache, least recently used first
    for index in range(data.per_epoch):
        for ref in data.global_batch_refs(index):
            if ref.shard not in cache:
                loads += 1
                cache = cache[-(data.cache_shards - 1) :]
            else:
                cache.remove(ref.shard)
            cache.append(ref.shard)
    assert loads <= 2 * len(data.by_shard)  # a random order over all samples would load a shard per sample


def test_two_small_stages_train_and_log_to_mlflow(stage1):
    from mlflow import MlflowClient

    decoder = infgen.load(stage1["result"]["decoder"])
    latents = torch.randn(1, 4, 8, 8)
    assert infgen.decode(decoder, latents, (72, 136)).shape == (1, 3, 72, 136)

    client = MlflowClient(stage1["tracking"])
    run = client.get_run(stage1["result"]["mlflow_run_id"])
    assert run.data.params["stage"] == "stage1-small" and run.data.params["optimizer.peak_lr"] == "0.001"
    history = client.get_metric_history(run.info.run_id, "l1")
    assert sorted(m.step for m in history) == list(range(STAGE1_SMALL.steps))
    assert {m.key for m in client.get_metric_history(run.info.run_id, "discriminator")} == {"discriminator"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"decoder", "validation", "deepspeed_generator.json"} <= artifacts
    # one grid per validation size: the latent record's 1×, largest square and widest sizes
    sizes = read_latent_record(stage1["latents"]).validation_sizes()
    assert len(client.list_artifacts(run.info.run_id, "validation")) == len(sizes)
    # The grid decodes held-out images (never trained on), encoded once before training and kept for resume.
    saved = np.load(stage1["storage"] / "stage1" / "validation_latents.npz")
    keys = saved["keys"].tolist()
    assert saved["latents"].shape == (len(keys), 4, 8, 8) and 0 < len(keys) <= 4
    trained = set()
    for shard in Path(stage1["latents"]).glob("*.parquet"):
        trained |= set(pq.read_table(shard, columns=["key"]).column("key").to_pylist())
    assert not trained & set(keys)
    assert run.data.tags["infgen.validation_keys"] == ",".join(keys)

    # stage 2 starts from stage 1's final decoder
    storage, tracking = str(stage1["storage"]), stage1["tracking"]
    second = run_training(
        STAGE2_SMALL, stage1["latents"], stage1["images"], f"{storage}/stage2", StageTracking(tracking),
        init_from=stage1["result"]["decoder"],
    )  # fmt: skip
    assert second["mlflow_run_id"] != run.info.run_id
    assert client.get_run(second["mlflow_run_id"]).data.params["stage"] == "stage2-small"
    assert infgen.load(second["decoder"]).config == decoder.config


def test_a_run_that_fails_mid_way_resumes_to_the_same_losses(stage1):
    run_training(  # checkpoints every 4 steps: resumes at 4
        STAGE1_SMALL, stage1["latents"], stage1["images"], str(stage1["storage"] / "failed"),
        StageTracking(stage1["tracking"]), hooks=FailOnceAt(6),
    )  # fmt: skip
    assert (stage1["storage"] / "failed" / "injected_failure").read_text() == "6"
    resumed = losses_by_step(stage1["storage"] / "failed" / "losses.jsonl")
    replayed = [
        json.loads(line)["step"]
        for line in (stage1["storage"] / "failed" / "losses.jsonl").read_text().splitlines()
    ]
    assert (
        replayed.count(4) == 2 and replayed.count(5) == 2
    )  # steps 4–5 ran twice: before and after the failure
    uninterrupted = losses_by_step(stage1["storage"] / "stage1" / "losses.jsonl")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(STAGE1_SMALL.steps))
    for step in range(STAGE1_SMALL.steps):
        for name in ("total", "l1", "perceptual", "gan", "lr"):
            assert resumed[step][name] == pytest.approx(uninterrupted[step][name], abs=1e-6), (step, name)


def test_bad_latents_stop_with_the_batch_named(embedded_latents, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    latents = tmp_path / "latents"
    shutil.copytree(embedded_latents["latents"], latents)
    (latents / "manifest.json").unlink()  # rewritten shards no manifest vouches for: only the NaNs stop it
    for shard in sorted(latents.glob("*.parquet")):
        table = pq.read_table(shard)
        values = table.column("latent").combine_chunks()
        flat = values.flatten().to_numpy().copy()
        flat[:] = float("nan")  # every latent of every shard: whichever batch comes first meets one
        poisoned = pa.FixedSizeListArray.from_arrays(pa.array(flat), values.type.list_size)
        pq.write_table(table.set_column(table.schema.get_field_index("latent"), "latent", poisoned), shard)
    data = LatentBatches(str(latents), str(embedded_latents["images"]), 4, seed=0)
    with pytest.raises(ValueError, match="non-finite latents in global batch 0"):
        data.batch(0, rank=0, world_size=2)


def test_the_final_decoder_logged_to_mlflow_loads_back(stage1, tmp_path):
    import mlflow

    local = mlflow.artifacts.download_artifacts(
        run_id=stage1["result"]["mlflow_run_id"], artifact_path="decoder", dst_path=str(tmp_path),
        tracking_uri=stage1["tracking"],
    )  # fmt: skip
    reloaded = infgen.load(local)
    original = infgen.load(stage1["result"]["decoder"])
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_killed_driver_resumes_to_the_same_losses(stage1, ray_address):
    """SIGKILL the whole driver process group after the first checkpoint, rerun the same command: training
    resumes from that checkpoint and logs the uninterrupted run's losses step for step."""
    import os
    import subprocess
    import sys
    import time

    storage = stage1["storage"]
    command = [
        sys.executable, "-m", "jobs.cli", "train", "--preset", "stage1-small", "--latents", stage1["latents"],
        "--images", stage1["images"], "--output", str(storage / "killed"),
        "--ray-address", ray_address, "--tracking-uri", stage1["tracking"],
    ]  # fmt: skip
    log = storage / "killed" / "losses.jsonl"
    driver = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    # poll the file system for the condition (a checkpoint exists and later steps have run), with a deadline
    while not (
        list((storage / "killed").glob("checkpoint_*")) and log.exists() and len(log.read_text().split()) >= 6
    ):
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    steps_before = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert max(steps_before) < STAGE1_SMALL.steps - 1, "the kill must land before the end"

    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    resumed = losses_by_step(log)
    uninterrupted = losses_by_step(storage / "stage1" / "losses.jsonl")
    assert sorted(resumed) == list(range(STAGE1_SMALL.steps))
    all_steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert len(all_steps) > STAGE1_SMALL.steps  # some steps ran before and after the kill
    for step in range(STAGE1_SMALL.steps):
        for name in ("total", "l1", "perceptual", "gan", "lr"):
            assert resumed[step][name] == pytest.approx(uninterrupted[step][name], abs=1e-6), (step, name)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_all(stage1):
    config = dataclasses.replace(STAGE1_SMALL.with_steps(6, gan_start_step=5), checkpoint_every=6)
    run_training(
        config, stage1["latents"], stage1["images"], str(stage1["storage"] / "nan"),
        StageTracking(stage1["tracking"]), hooks=NonFiniteLossAt(3),
    )  # fmt: skip
    logged = losses_by_step(stage1["storage"] / "nan" / "losses.jsonl")
    assert sorted(logged) == [0, 1, 2, 4, 5]  # step 3 skipped, and no rank hung waiting for the other
    assert logged[2]["skipped_batches"] == 0 and logged[4]["skipped_batches"] == 1


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_stage2_continues_stage1_with_its_discriminator_optimizers_and_ema(stage1):
    """--continue-from: stage 2 starts with stage 1's last checkpoint (decoder, EMA, discriminator, both
    optimizers' state), its own hyperparameters, an LR that does not warm up from zero again, and the GAN on
    from step 0 although its config says later (the discriminator is trained)."""
    run = stage1["storage"] / "stage1"
    # on 1 worker, stage 1 ran on 2: ZeRO 0 checkpoints load on any worker count, both engines' state whole
    config = dataclasses.replace(STAGE2_SMALL, num_workers=1).with_gan_start(4)
    output = stage1["storage"] / "continued"
    manifest = run_training(
        config, stage1["latents"], stage1["images"], str(output), StageTracking(stage1["tracking"]),
        continue_from=str(run), hooks=RecordStart(),
    )  # fmt: skip
    started = torch.load(output / "started.pt", weights_only=True)
    steps = STAGE1_SMALL.steps
    (last,) = [c.parent for c in run.glob("checkpoint_*/trainer_state.pt") if torch.load(c)["step"] == steps]
    saved = {  # DeepSpeed's files (fp32, ZeRO 0: module and optimizer state in one file per engine)
        name: torch.load(last / name / f"step{steps}" / "mp_rank_00_model_states.pt", weights_only=False)
        for name in ("generator", "discriminator")
    }
    assert same_tensors(started["ema"], torch.load(last / "trainer_state.pt")["ema"])
    assert same_tensors(started["decoder"], saved["generator"]["module"])
    assert same_tensors(started["discriminator"], saved["discriminator"]["module"])
    for name in ("generator", "discriminator"):
        before, after = saved[name]["optimizer"]["state"], started[f"{name}_optimizer"]["state"]
        assert before and before.keys() == after.keys()
        assert all(same_tensors(before[index], after[index]) for index in before), name
    assert started["discriminator_optimizer"]["param_groups"][0]["lr"] == config.optimizer.discriminator_lr

    # The first LR is the peak (a warm restart), where a fresh start takes a warm-up's first step.
    peak = config.optimizer.peak_lr
    assert started["lr"] == pytest.approx(peak)
    logged = losses_by_step(output / "losses.jsonl")
    assert logged[0]["lr"] == pytest.approx(peak)
    fresh = losses_by_step(run / "losses.jsonl")[0]["lr"]  # stage 1 started fresh: warm-up from zero
    assert fresh == pytest.approx(STAGE1_SMALL.optimizer.peak_lr / STAGE1_SMALL.optimizer.warmup_steps)
    # The GAN is on from step 0, and the record says so and what the run continued.
    assert "discriminator" in logged[0] and manifest["config"]["loss"]["gan_start_step"] == 0
    assert manifest["inputs"]["continue_from"] == {"run": str(run), "checkpoint": last.name, "step": steps}


def test_bad_starting_points_are_refused_naming_the_path_and_the_problem(stage1, tmp_path):
    run, decoder = str(stage1["storage"] / "stage1"), stage1["result"]["decoder"]
    with pytest.raises(ValueError, match=rf"--continue-from {decoder} is not a training run's .*--init-from"):
        find_continuation(decoder)
    with pytest.raises(ValueError, match=rf"--init-from {run} is a training run's output .*--continue-from"):
        check_decoder_folder(run)
    check_decoder_folder(decoder)  # a decoder folder is what --init-from takes
    with pytest.raises(FileNotFoundError, match=rf"--continue-from {tmp_path}/missing does not exist"):
        find_continuation(str(tmp_path / "missing"))
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "training.json").write_text("{}")
    with pytest.raises(ValueError, match=r"unfinished: that training run has not finished \(no manifest"):
        find_continuation(str(tmp_path / "unfinished"))

    continuation = find_continuation(run)
    bf16 = dataclasses.replace(STAGE2_SMALL, precision="bf16", zero_stage=1, num_workers=1, global_batch=2)
    decoder_config = model_config(bf16, read_latent_record(stage1["latents"]))
    expected = r"cannot continue that run: precision 'fp32' there, 'bf16' here; zero_stage 0 there, 1 here; "
    with pytest.raises(ValueError, match=expected[:-2] + "$"):  # its worker count (2, here 1) may differ
        check_compatible(continuation, bf16, decoder_config)
    with pytest.raises(ValueError, match="give one"):
        run_training(STAGE2_SMALL, stage1["latents"], stage1["images"], str(tmp_path / "both"),
                     StageTracking(stage1["tracking"]), init_from=decoder, continue_from=run)  # fmt: skip
    assert not (tmp_path / "both").exists()  # refused before anything was written
