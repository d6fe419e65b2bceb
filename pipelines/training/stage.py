"""The training stage's driver: a Ray Train TorchTrainer over `train_loop`, one MLflow run per training run.

Resume: rerun with the same storage path and name; Ray Train restores the latest checkpoint, and worker
failures within a run restart from it on their own (`max_failures`). The MLflow run is found again by its
`infgen.run_name` tag, so a resumed run keeps logging into the same MLflow run.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.signals import sigint_handler_kept
from pipelines.tracking import absolute, flatten, local_artifact_location
from pipelines.training.config import TrainConfig
from pipelines.training.loop import train_loop
from pipelines.training.validation import write_validation_latents


def mlflow_run(tracking_uri: str, config: TrainConfig, name: str, parent_run_id: str | None) -> str:
    """The MLflow run of this training run: created with the config as params, or found again on resume."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(config.mlflow_experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(config.mlflow_experiment, local_artifact_location(tracking_uri))
    )
    query = f"tags.`infgen.run_name` = '{name}'"
    if parent_run_id:  # workflows share an experiment: stage1 of this workflow, not of an earlier one
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    found = client.search_runs([experiment_id], query, max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"infgen.run_name": name, "mlflow.runName": name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=tags)
    for key, value in flatten(config.to_dict()).items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    client.log_dict(run.info.run_id, config.deepspeed_config(), "deepspeed_generator.json")
    return run.info.run_id


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
    storage: str,
    name: str,
    tracking_uri: str,
    init_from: str | None = None,
    parent_run_id: str | None = None,
    max_failures: int = 1,
) -> dict:
    """Train (or resume) one stage; returns {"decoder": final EMA decoder dir, "mlflow_run_id", "metrics"}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage, latents, images = absolute(storage), absolute(latents), absolute(images)
    init_from = absolute(init_from) if init_from else None
    run_id = mlflow_run(tracking_uri, config, name, parent_run_id)
    validation = write_validation_latents(images, latents, f"{storage}/{name}/validation_latents.npz")
    loop_config = {
        "train": config.to_dict(),
        "latents": latents,
        "images": images,
        "storage": storage,
        "name": name,
        "init_from": init_from,
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "validation_latents": validation,
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
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_environment(config.use_gpu)},
        ),
    )
    with sigint_handler_kept():  # Ray Train's fit leaves its own SIGINT handler installed
        result = trainer.fit()
    if result.error:
        raise result.error
    decoder = str(Path(storage) / name / "final_decoder")
    return {"decoder": decoder, "mlflow_run_id": run_id, "metrics": dict(result.metrics or {})}
