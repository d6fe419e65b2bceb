"""The training stage's driver: a Ray Train TorchTrainer over `train_loop`, one MLflow run per training run,
OUTPUT/manifest.json at the end like every other stage.

OUTPUT is the run's folder: Ray Train's storage path is its parent and the run's name its base name, so
checkpoints, losses.jsonl, validation latents and the final decoder all live under it. Resume: rerun with the
same output; Ray Train restores the latest checkpoint, and worker failures within a run (a worker or node
lost) restart the workers from it on their own, up to `max_failures` times. The worker count is a resource
field: a rerun on another one resumes too, on the same global batches, the DeepSpeed state re-sharded when
ZeRO partitioned it (pipelines/training/resharding.py). The MLflow run is found again by its tags, so a
resumed run keeps logging into the same MLflow run.

A run starts from scratch, from a decoder folder (`init_from`: weights only) or from a finished run
(`continue_from`: decoder, EMA, discriminator and optimizer state; pipelines/training/continuation.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from pipelines.common.files import absolute, file_sha256
from pipelines.common.latent_record import LatentRecord, read_latent_record
from pipelines.common.run_lock import RunLock
from pipelines.common.signals import sigint_handler_kept
from pipelines.common.stage_output import claim_output, finish_stage, manifest_header
from pipelines.common.tracking import StageTracking, flatten, open_stage_run
from pipelines.training.config import TrainConfig
from pipelines.training.continuation import (
    Continuation,
    check_compatible,
    check_decoder_folder,
    continued_config,
    find_continuation,
)
from pipelines.training.loop import require_reachable_master_weights, train_loop
from pipelines.training.validation import write_validation_latents
from pipelines.training.warm_start import warm_start_decoder

MANIFEST_VERSION = 1
RECORD_NAME = "training.json"
DECODER_DIR = "final_decoder"


def model_config(config: TrainConfig, record: LatentRecord):
    """The decoder's InfGenConfig: the preset and its overrides, with what the latents fix taken from their
    record (the latent channels, and the in-distribution scale: how far beyond the input side the training
    targets reach, which decides when decoding must extrapolate)."""
    import infgen

    derived = {
        "latent_channels": record.latent_channels,
        "in_distribution_scale": record.in_distribution_scale,
    }
    return infgen.preset(config.model_preset, **{**config.model_overrides, **derived})


def mlflow_run(tracking: StageTracking, config: TrainConfig, name: str, output: str) -> str:
    """The MLflow run of this training run: the open one (the command opened it), found again on resume or
    created; the config logged as params once."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking.uri)
    # Workflows share an experiment: stage1 of this workflow (its parent run), not of an earlier one.
    run_id = open_stage_run(tracking, config.mlflow_experiment, name, output)
    if not client.get_run(run_id).data.params:
        for key, value in flatten(config.to_dict()).items():
            client.log_param(run_id, key, str(value)[:6000])
        client.log_dict(run_id, config.deepspeed_config(), "deepspeed_generator.json")
    return run_id


def starting_point(
    config: TrainConfig, decoder_config, init_from: str | None, continue_from: str | None
) -> tuple[TrainConfig, Continuation | None]:
    """Check what the run starts from, and say it; returns the config (a continued run keeps the GAN on
    from step 0) and the continuation, if any."""
    if init_from and continue_from:
        raise ValueError(
            f"--init-from {init_from} and --continue-from {continue_from}: give one (a decoder folder to "
            "start from its weights, or a finished run's folder to continue it)"
        )
    if init_from:
        check_decoder_folder(init_from)
        print(
            f"train: starting from the decoder weights in {init_from} only: the EMA starts from them, the "
            f"discriminator and both optimizers start fresh, the GAN at step {config.loss.gan_start_step}"
        )
        return config, None
    if continue_from:
        continuation = find_continuation(continue_from)
        check_compatible(continuation, config, decoder_config)
        print(
            f"train: continuing {continuation.run} ({continuation.manifest['config']['stage']}, step "
            f"{continuation.step}): its decoder, EMA, discriminator and optimizer state carry; this run's "
            "hyperparameters apply"
        )
        return continued_config(config, continuation), continuation
    return config, None


def worker_environment(use_gpu: bool) -> dict[str, str]:
    # Ray Train V2 patches print() on its workers to log as well as print: every progress line reached the
    # driver twice. Our lines are progress only (losses.jsonl and MLflow keep the record), so printed once.
    environment = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not use_gpu:
        environment["DS_ACCELERATOR"] = "cpu"  # rather than let DeepSpeed probe a CUDA build of torch
    return environment


def run_training(
    config: TrainConfig,
    latents: str,
    images: str,
    output: str,
    tracking: StageTracking,
    init_from: str | None = None,
    hooks=None,
    continue_from: str | None = None,
) -> dict:
    """Train (or resume) one stage into `output`; returns the manifest ("decoder": the final EMA decoder's
    folder, "mlflow_run_id", "metrics"...). `init_from`: a decoder folder (weights only); `continue_from`: a
    finished training run's output folder (its whole state). `hooks`: test fault injection
    (pipelines/training/loop.py)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    output, latents, images = absolute(output).rstrip("/"), absolute(latents), absolute(images)
    init_from = absolute(init_from) if init_from else None
    continue_from = absolute(continue_from) if continue_from else None
    require_reachable_master_weights(config)  # bad input fails here, before anything is written
    record = read_latent_record(latents).limited_to(config.max_target_side)
    decoder_config = model_config(config, record)
    config, continuation = starting_point(config, decoder_config, init_from, continue_from)
    geometry = {key: value for key, value in dataclasses.asdict(record).items() if key != "path"}
    inputs = {"latents": latents, "images": images, "init_from": init_from, "latent_geometry": geometry}
    if continuation:  # only then: the records of runs that continue nothing stay as they were
        inputs["continue_from"] = continuation.record()
    os.makedirs(output, exist_ok=True)
    started = time.perf_counter()
    with RunLock(f"{output}/_LOCK"):
        wanted = {"config": config.to_dict(), "inputs": inputs}
        refused = "a training run with another config or other inputs"
        claim_output(output, RECORD_NAME, wanted, config.RESOURCE_FIELDS, refused)
        name = tracking.run_name or os.path.basename(output)
        run_id = mlflow_run(tracking, config, name, output)
        validation_sizes = [list(size) for size in config.validation_sizes or record.validation_sizes()]
        validation = write_validation_latents(
            images, record, f"{output}/validation_latents.npz", sizes=validation_sizes
        )
        starting_decoder = init_from
        if not init_from and not continuation and config.warm_start == "vae":
            starting_decoder = warm_start_decoder(config, decoder_config, record, output)
        loop_config = {
            "train": config.to_dict(),
            "model": decoder_config.to_dict(),
            "latents": latents,
            "images": images,
            "output": output,
            "init_from": starting_decoder,
            "continue_from": continuation.checkpoint if continuation else None,
            "tracking_uri": tracking.uri,
            "mlflow_run_id": run_id,
            "validation_latents": validation,
            "validation_sizes": validation_sizes,
            "latent_geometry": geometry,
            "hooks": hooks,
            "threads_per_worker": 1
            if not config.use_gpu
            else max(1, (os.cpu_count() or 2) // config.num_workers),
        }
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
            run_config=RunConfig(
                name=os.path.basename(output),
                storage_path=os.path.dirname(output),
                failure_config=FailureConfig(max_failures=config.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": worker_environment(config.use_gpu)},
            ),
        )
        with sigint_handler_kept():  # Ray Train's fit leaves its own SIGINT handler installed
            result = trainer.fit()
        if result.error:
            raise result.error
        decoder = str(Path(output) / DECODER_DIR)
        weights = f"{DECODER_DIR}/model.safetensors"
        manifest = {
            **manifest_header(MANIFEST_VERSION),
            "config": config.to_dict(),
            "model": decoder_config.to_dict(),
            "inputs": inputs,
            "decoder": decoder,
            "mlflow_run_id": run_id,
            "metrics": dict(result.metrics or {}),
            "counts": {"steps": config.steps},
            "seconds": round(time.perf_counter() - started, 1),
            # The files this manifest vouches for (a workflow notices when one changes behind its back), and
            # what a workflow shows on its own run.
            "checksums": {weights: file_sha256(f"{output}/{weights}")},
            "published": {"decoder": DECODER_DIR},
        }
        finish_stage("train", output, manifest, tracking=None)  # the run was logged as it trained
    print(f"train: final EMA decoder in {decoder} (MLflow run {run_id})")
    return manifest
