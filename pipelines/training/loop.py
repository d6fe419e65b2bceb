"""The per-worker training loop (Ray Train TorchTrainer), with two DeepSpeed engines: decoder and PatchGAN.

Exact resume: a checkpoint holds both engines (weights, optimizer and LR-scheduler state), the EMA decoder
and the step; batches are a pure function of the step (pipelines/training/data.py) and every random crop of
the loss comes from a generator seeded by (seed, step, rank), so a resumed run repeats the uninterrupted one
step for step. Bad data policy: a latent batch of the wrong shape or with non-finite values is an error
naming the batch (a data bug to fix, not noise); a non-finite loss skips the step on every rank, is counted
and logged, and more than `MAX_SKIPPED_IN_A_ROW` in a row stops the run.

Tests inject faults through `hooks` (an object passed in, never part of the config):
`hooks.before_step(step, rank, run_dir)` may raise, and `hooks.loss(total, step, rank)` may replace the loss
(tests/training_faults.py).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass

import torch

MAX_SKIPPED_IN_A_ROW = 5


def lr_lambda(config):
    """Linear warm-up to the peak, then cosine decay to `final_lr` at the last step (as a factor of peak)."""
    optimizer = config.optimizer
    floor = optimizer.final_lr / optimizer.peak_lr

    def factor(step: int) -> float:
        if step < optimizer.warmup_steps:
            return (step + 1) / optimizer.warmup_steps
        progress = (step - optimizer.warmup_steps) / max(1, config.steps - optimizer.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases or the INPE (docs/paper.md, "Defaults where the paper is silent")."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 or "inpe" in name else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _crop_generator(seed: int, step: int, rank: int, which: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 64 + rank) * 2 + which)


@dataclass
class Engines:
    """What one worker trains with: the decoder and its EMA, the loss (frozen LPIPS + discriminator), and the
    two DeepSpeed engines (decoder, discriminator) with the decoder's LR scheduler."""

    model: torch.nn.Module  # the decoder module inside `generator` (DeepSpeed moved and cast it in place)
    ema: torch.nn.Module  # fp32, on the engines' device
    loss: torch.nn.Module  # DecoderLoss; its discriminator is the module inside `discriminator`
    generator: object  # deepspeed.DeepSpeedEngine
    discriminator: object  # deepspeed.DeepSpeedEngine
    scheduler: torch.optim.lr_scheduler.LRScheduler


def build_engines(config, init_from: str | None = None, model_config=None) -> Engines:
    """The model, EMA, loss and both DeepSpeed engines from the typed config (no Ray: the torch process group
    must already exist, or DeepSpeed sets one up from RANK/WORLD_SIZE/MASTER_ADDR/... itself). `model_config`
    (an InfGenConfig) defaults to the config's preset with its overrides; the training stage passes the one
    it derived from the latent record."""
    import deepspeed

    import infgen
    from infgen.losses import DecoderLoss

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = infgen.InfGen(model_config or infgen.preset(config.model_preset, **config.model_overrides))
    if init_from:
        model.load_state_dict(infgen.load(init_from).state_dict())
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # fp32, whatever precision the engine trains in
    model.set_activation_checkpointing(config.activation_checkpointing)
    loss = DecoderLoss(config.loss)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, config.optimizer.weight_decay),
        config=config.deepspeed_config(),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config)),
    )
    discriminator, _, _, _ = deepspeed.initialize(
        model=loss.discriminator,
        model_parameters=loss.discriminator.parameters(),
        config=config.deepspeed_config(discriminator=True),
    )
    # DeepSpeed moved (and cast) the decoder and the discriminator; the frozen LPIPS (fp32: the bf16 inputs
    # are promoted by its scaling layer) and the EMA follow them to the engines' device.
    loss.perceptual.to(engine.device)
    ema.to(engine.device)
    return Engines(model, ema, loss, engine, discriminator, scheduler)


def train_step(
    parts: Engines, config, latents: torch.Tensor, truth: torch.Tensor, step: int, rank: int, hooks=None
) -> dict | None:
    """One step of both engines and the EMA on this rank's batch → the step's metrics (floats), or None when
    the loss was not finite on some rank: then no rank updates anything (every rank takes the same branch,
    or the collectives in backward/step would hang)."""
    import torch.distributed as dist

    engine, loss = parts.generator, parts.loss
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    latents, truth = latents.to(engine.device, dtype), truth.to(engine.device, dtype)
    size = tuple(truth.shape[-2:])
    prediction = engine(latents, size)
    crops = _crop_generator(config.seed, step, rank, 0)
    losses = loss.generator_loss(prediction, truth, step, generator=crops)
    if hooks is not None:
        losses["total"] = hooks.loss(losses["total"], step, rank)
    # On the engines' device: NCCL (GPU workers) reduces only device tensors.
    finite = torch.isfinite(losses["total"].detach()).to(torch.float32).reshape(1)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1:
        return None
    engine.backward(losses["total"])
    engine.step()
    metrics = {name: value.item() for name, value in losses.items()}
    if loss.gan_active(step):
        crops = _crop_generator(config.seed, step, rank, 1)
        d_losses = loss.discriminator_loss(prediction, truth, step, crops)
        parts.discriminator.backward(d_losses["discriminator"])
        parts.discriminator.step()
        metrics.update({name: value.item() for name, value in d_losses.items()})
    with torch.no_grad():
        for average, current in zip(parts.ema.parameters(), parts.model.parameters()):
            average.lerp_(current.detach().float().to(average.dtype), 1 - config.ema_decay)
    metrics["lr"] = parts.scheduler.get_last_lr()[0]
    return metrics


def train_loop(loop_config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    import infgen
    from pipelines.training.config import TrainConfig
    from pipelines.training.data import LatentBatches
    from pipelines.training.mlflow_rank0 import RankZeroLogger

    config = TrainConfig.from_dict(loop_config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))

    model_config = infgen.InfGenConfig.from_dict(loop_config["model"])
    parts = build_engines(config, loop_config.get("init_from"), model_config)
    engine, discriminator, ema = parts.generator, parts.discriminator, parts.ema
    data = LatentBatches(loop_config["latents"], loop_config["images"], config.global_batch, config.seed)
    logger = RankZeroLogger(loop_config, rank)
    hooks = loop_config.get("hooks")

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(os.path.join(directory, "generator"))
            discriminator.load_checkpoint(os.path.join(directory, "discriminator"))
            state = torch.load(os.path.join(directory, "trainer_state.pt"), weights_only=True)
        ema.load_state_dict(state["ema"])
        start_step = int(state["step"])
        logger.line(f"train: resumed at step {start_step} from {checkpoint.path}")

    expected_latent = (parts.model.config.latent_channels,)
    skipped_total, skipped_in_a_row = 0, 0
    for step in range(start_step, config.steps):
        step_started = time.perf_counter()
        if hooks is not None:
            hooks.before_step(step, rank, loop_config["output"])
        latents, truth = data.batch(step, rank, world)
        if latents.shape[1:2] != expected_latent:
            raise ValueError(
                f"batch {step}: latents of shape {tuple(latents.shape)}; decoder takes C={expected_latent[0]}"
            )
        metrics = train_step(parts, config, latents, truth, step, rank, hooks)
        if metrics is None:
            skipped_total, skipped_in_a_row = skipped_total + 1, skipped_in_a_row + 1
            logger.line(f"train: step {step}: non-finite loss, batch skipped ({skipped_total} so far)")
            if skipped_in_a_row > MAX_SKIPPED_IN_A_ROW:
                raise FloatingPointError(f"{skipped_in_a_row} non-finite losses in a row at step {step}")
            continue
        skipped_in_a_row = 0
        metrics["skipped_batches"] = skipped_total
        metrics["step_seconds"] = time.perf_counter() - step_started  # data + forward + backward + steps
        logger.step(step, metrics, config)

        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            _checkpoint(engine, discriminator, ema, done, rank, metrics, Checkpoint, config)

    if rank == 0:
        logger.finish(ema, data, config)


def _checkpoint(engine, discriminator, ema, step: int, rank: int, metrics: dict, Checkpoint, config) -> None:
    import ray.train

    import infgen

    with tempfile.TemporaryDirectory() as directory:
        # Separate folders: each engine writes its own `latest` tag file.
        engine.save_checkpoint(os.path.join(directory, "generator"), tag=f"step{step}")
        discriminator.save_checkpoint(os.path.join(directory, "discriminator"), tag=f"step{step}")
        if rank == 0:
            torch.save({"ema": ema.state_dict(), "step": step}, os.path.join(directory, "trainer_state.pt"))
            infgen.save(ema, os.path.join(directory, "ema_decoder"), {"step": step, "stage": config.stage})
        # Every rank reports (a barrier); Ray merges the ranks' folders into one persisted checkpoint.
        ray.train.report({"step": step, **metrics}, checkpoint=Checkpoint.from_directory(directory))
