"""The per-worker training loop (Ray Train TorchTrainer), with two DeepSpeed engines: decoder and PatchGAN.

Exact resume: a checkpoint holds both engines (weights, optimizer and LR-scheduler state), the EMA decoder
and the step; batches are a pure function of the step (pipelines/training/data.py) and every random crop of
the loss comes from a generator seeded by (seed, step, part: the micro batch's place in the global batch), so
a resumed run repeats the uninterrupted one step for step. A resume on another worker count trains on the same
global batches, its gradients the same means over them (each worker's share split into micro batches of
`micro_batch`, gradients accumulated: config.batch_split); only the random crops (drawn per micro batch) and
the order of the float reductions differ.

Bad data policy: a latent batch of the wrong shape or with non-finite values is an error naming the batch (a
data bug to fix, not noise); a non-finite loss (of any micro batch) skips the step on every rank, is counted
and logged, and more than `MAX_SKIPPED_IN_A_ROW` in a row stops the run.

Continuing a finished stage (`--continue-from`, pipelines/training/continuation.py): when the run has no
checkpoint of its own, both engines load the previous stage's last checkpoint with their optimizer state (the
decoder's fp32 master weights and AdamW moments, the discriminator's weights and Adam moments) but not its LR
scheduler, the optimizers keep this stage's hyperparameters, and the EMA is the previous stage's.

The EMA follows DeepSpeed's fp32 master weights, not the module's bf16 copy: averaging bf16-rounded weights
would round every update of a 0.9999 EMA (one part in 10^4 of a step) away.

Tests inject faults through `hooks` (an object passed in, never part of the config):
`hooks.before_step(step, rank, run_dir)` may raise, `hooks.loss(total, step, part)` may replace the loss of
micro batch `part` (its index among the global batch's micro batches: the rank without accumulation), and
`hooks.started(parts, rank, run_dir)`, if the object has it, sees the engines before the first step
(tests/training_faults.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

MAX_SKIPPED_IN_A_ROW = 5


def lr_lambda(config, continued: bool = False):
    """Linear warm-up to the peak, then cosine decay to `final_lr` at the last step (as a factor of peak).
    A fresh run warms up from zero over `warmup_steps`; a continued one (its AdamW moments carried) from
    `final_lr`, where the previous stage ended, over `continued_warmup_steps` (0: at the peak from step 0)."""
    optimizer = config.optimizer
    floor = optimizer.final_lr / optimizer.peak_lr
    warmup = optimizer.continued_warmup_steps if continued else optimizer.warmup_steps
    start = floor if continued else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def require_reachable_master_weights(config) -> None:
    """bf16 needs ZeRO stage ≥ 1. With ZeRO stage 0, DeepSpeed 0.19 keeps the fp32 master weights of bf16
    training in its FP16_UnfusedOptimizer, where its public API (`deepspeed.utils.safe_get_full_fp32_param`)
    does not reach them, and the EMA must follow them (module docstring). On one worker ZeRO 1 partitions
    nothing, so it costs nothing there."""
    if config.precision == "bf16" and config.zero_stage < 1:
        raise ValueError(
            f"training config {config.stage!r}: bf16 needs zero_stage ≥ 1, got {config.zero_stage}; "
            "the EMA follows DeepSpeed's fp32 master weights, which its public API reaches only under ZeRO"
        )


def fp32_master_weights(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The fp32 weights the optimizer updates, one per parameter of the DeepSpeed-wrapped `model`, in its
    parameter order. In fp32 runs these are the module's own weights. In bf16 runs (ZeRO 1/2) each is
    gathered from the ranks' partitions: an all-reduce per parameter, so every rank must iterate this, all
    the way, in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    for name, parameter in model.named_parameters():
        if parameter.dtype == torch.float32:
            yield parameter
            continue
        master = safe_get_full_fp32_param(parameter)
        if master is None:
            raise RuntimeError(f"DeepSpeed holds no fp32 master copy of {name} ({parameter.dtype})")
        yield master


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


def build_engines(
    config,
    init_from: str | None = None,
    model_config=None,
    continued: bool = False,
    load_universal: bool = False,
) -> Engines:
    """The model, EMA, loss and both DeepSpeed engines from the typed config (no Ray: the torch process group
    must already exist, or DeepSpeed sets one up from RANK/WORLD_SIZE/MASTER_ADDR/... itself). `model_config`
    (an InfGenConfig) defaults to the config's preset with its overrides; the training stage passes the one
    it derived from the latent record. `init_from`: a decoder folder whose weights the decoder (and its EMA)
    start from. `continued`: the run will load a previous stage's state (`continue_training_state`), so its
    LR schedule is the continued one. `load_universal`: the engines will load a universal checkpoint (one
    written by another worker count: pipelines/training/resharding.py)."""
    import deepspeed

    import infgen
    from infgen.losses import DecoderLoss

    require_reachable_master_weights(config)
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
        config=config.deepspeed_config(load_universal=load_universal),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(config, continued)
        ),
    )
    discriminator, _, _, _ = deepspeed.initialize(
        model=loss.discriminator,
        model_parameters=loss.discriminator.parameters(),
        config=config.deepspeed_config(discriminator=True, load_universal=load_universal),
    )
    # DeepSpeed moved (and cast) the decoder and the discriminator; the frozen LPIPS (fp32: the bf16 inputs
    # are promoted by its scaling layer) and the EMA follow them to the engines' device.
    loss.perceptual.to(engine.device)
    ema.to(engine.device)
    return Engines(model, ema, loss, engine, discriminator, scheduler)


def training_window(
    size: tuple[int, int], side: int | None, generator: torch.Generator
) -> tuple[int, int, int, int] | None:
    """A random (top, left, height, width) window of at most side² of a size-h×w target, or None (whole)."""
    if side is None or (size[0] <= side and size[1] <= side):
        return None
    height, width = min(size[0], side), min(size[1], side)
    top = int(torch.randint(size[0] - height + 1, (1,), generator=generator))
    left = int(torch.randint(size[1] - width + 1, (1,), generator=generator))
    return top, left, height, width


def train_step(
    parts: Engines, config, latents: torch.Tensor, truth: torch.Tensor, step: int, rank: int, hooks=None
) -> dict | None:
    """One optimizer step of both engines and the EMA on this rank's share of the global batch → the step's
    metrics (floats: means over the whole global batch, the same on every rank, whatever the worker count and
    accumulation), or None when the loss was not finite on some rank: then no rank updates anything (every
    rank takes the same branch, or the collectives in backward/step would hang).

    The share is `config.accumulation_steps` micro batches of `config.micro_batch`: each is forwarded and
    backpropagated on its own (DeepSpeed scales its loss by 1/accumulation and accumulates the gradients),
    and the engines reduce and step once, after the last (`set_gradient_accumulation_boundary`, so a step
    is one `engine.step()` whatever the accumulation, and a skipped step leaves the micro-step count alone).
    Random crops are drawn per micro batch, from its place in the global batch (`part`)."""
    accumulation, size = config.accumulation_steps, config.micro_batch
    if latents.shape[0] != accumulation * size:
        raise ValueError(
            f"step {step}: rank {rank} got {latents.shape[0]} samples, its share of the global batch is "
            f"{accumulation} micro batches of {size}"
        )
    engines = (parts.generator, parts.discriminator)
    gan = parts.loss.gan_active(step)
    lr = parts.scheduler.get_last_lr()[0]  # the LR this step uses (engine.step() moves the schedule on)
    sums: dict[str, float] = {}
    for micro in range(accumulation):
        for engine in engines:
            engine.set_gradient_accumulation_boundary(micro == accumulation - 1)
        part = slice(micro * size, (micro + 1) * size)
        index = rank * accumulation + micro  # the micro batch's place in the global batch
        metrics = _micro_step(parts, config, latents[part], truth[part], step, index, hooks)
        if metrics is None:
            for engine in engines:  # what earlier micro batches accumulated must not reach a later step
                engine.optimizer.zero_grad(set_to_none=True)
                engine.zero_grad()
            return None
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value
    parts.generator.step()
    if gan:
        parts.discriminator.step()
    with torch.no_grad():
        for average, master in zip(parts.ema.parameters(), fp32_master_weights(parts.model), strict=True):
            average.lerp_(master.detach().to(average.device, average.dtype), 1 - config.ema_decay)
    return {**_global_means(sums, accumulation, parts.generator.device), "lr": lr}


def _global_means(sums: dict[str, float], accumulation: int, device) -> dict[str, float]:
    """Each rank's sums over its micro batches → the means over every micro batch of the global batch (all
    equal in size, so the mean of the global batch's per-sample means)."""
    import torch.distributed as dist

    names = sorted(sums)
    totals = torch.tensor([sums[name] for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(totals)  # every rank has the same names: the GAN is on or off on all of them
    count = accumulation * dist.get_world_size()
    return {name: value / count for name, value in zip(names, totals.tolist())}


def _micro_step(
    parts: Engines, config, latents: torch.Tensor, truth: torch.Tensor, step: int, part: int, hooks
) -> dict | None:
    """Forward and backward of one micro batch (`part`: its index among the global batch's micro batches),
    both engines; None, before any backward, when its loss is not finite on some rank."""
    import torch.distributed as dist

    engine, loss = parts.generator, parts.loss
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    latents, truth = latents.to(engine.device, dtype), truth.to(engine.device, dtype)
    size = tuple(truth.shape[-2:])
    window = training_window(size, config.train_window, _crop_generator(config.seed, step, part, 2))
    if window is None:
        prediction = engine(latents, size)
    else:  # the same pixels as the whole decode's, at a fraction of the cost (InfGen.decode_window)
        prediction = engine(latents, size, window=window)
        top, left, height, width = window
        truth = truth[..., top : top + height, left : left + width]
    crops = _crop_generator(config.seed, step, part, 0)
    losses = loss.generator_loss(prediction, truth, step, generator=crops)
    if hooks is not None:
        losses["total"] = hooks.loss(losses["total"], step, part)
    # On the engines' device: NCCL (GPU workers) reduces only device tensors.
    finite = torch.isfinite(losses["total"].detach()).to(torch.float32).reshape(1)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1:
        return None
    engine.backward(losses["total"])
    metrics = {name: value.item() for name, value in losses.items()}
    if loss.gan_active(step):
        crops = _crop_generator(config.seed, step, part, 1)
        d_losses = loss.discriminator_loss(prediction, truth, step, crops)
        parts.discriminator.backward(d_losses["discriminator"])
        metrics.update({name: value.item() for name, value in d_losses.items()})
    return metrics


@contextlib.contextmanager
def _this_stages_hyperparameters(engine) -> Iterator[None]:
    """Loading an optimizer's state also loads the saved run's hyperparameters (lr, betas, weight decay,
    the scheduler's initial_lr): put this run's back, so only the state (moments, step counts) carries."""
    wanted = [
        {key: value for key, value in group.items() if key != "params"}
        for group in engine.optimizer.param_groups
    ]
    yield
    groups = engine.optimizer.param_groups
    if len(groups) != len(wanted):
        raise ValueError(f"the loaded optimizer has {len(groups)} parameter groups, this run {len(wanted)}")
    for group, values in zip(groups, wanted):
        group.update(values)


def _load_engine_state(engine, directory: str) -> None:
    """Weights and optimizer state (DeepSpeed restores fp32 masters exactly from its optimizer state), not
    the LR scheduler: this stage has its own schedule."""
    with _this_stages_hyperparameters(engine):
        path, _ = engine.load_checkpoint(
            directory, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory} (its 'latest' tag file is missing)")


def continue_training_state(parts: Engines, directory: str, engines_directory: str | None = None) -> int:
    """Start this run from a previous stage's checkpoint folder (generator/, discriminator/,
    trainer_state.pt): both engines' weights and optimizer state, and the EMA. Returns the previous stage's
    step. Every rank calls it (ZeRO ranks load their own partitions). `engines_directory`: where the engines
    load from instead, a universal conversion of `directory`'s (pipelines/training/resharding.py)."""
    engines_directory = engines_directory or directory
    _load_engine_state(parts.generator, os.path.join(engines_directory, "generator"))
    _load_engine_state(parts.discriminator, os.path.join(engines_directory, "discriminator"))
    state = torch.load(os.path.join(directory, "trainer_state.pt"), map_location="cpu", weights_only=True)
    parts.ema.load_state_dict(state["ema"])
    return int(state["step"])


def train_loop(loop_config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    import infgen
    from pipelines.training.config import TrainConfig
    from pipelines.training.data import LatentBatches
    from pipelines.training.mlflow_rank0 import RankZeroLogger
    from pipelines.training.resharding import loadable_checkpoint

    config = TrainConfig.from_dict(loop_config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))

    model_config = infgen.InfGenConfig.from_dict(loop_config["model"])
    continue_from = loop_config.get("continue_from")  # a previous stage's last checkpoint, or None
    data = LatentBatches(
        loop_config["latents"],
        loop_config["images"],
        config.global_batch,
        config.seed,
        max_target_side=config.max_target_side,
    )
    logger = RankZeroLogger(loop_config, rank)
    hooks = loop_config.get("hooks")

    # The run's own latest checkpoint (a resume: everything, the LR schedule included), else the previous
    # stage's (a continuation). Either may come from another worker count: then the engines load a
    # universal conversion of it (pipelines/training/resharding.py).
    checkpoint = ray.train.get_checkpoint()
    source = checkpoint or (Checkpoint(continue_from) if continue_from else None)
    start_step = 0
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(source.as_directory()) if source else None
        engines_directory, universal = directory, False
        if directory:
            loadable = loadable_checkpoint(directory, config.zero_stage, context.get_local_rank())
            engines_directory, universal = stack.enter_context(loadable)
        parts = build_engines(
            config, loop_config.get("init_from"), model_config, continued=bool(continue_from),
            load_universal=universal,
        )  # fmt: skip
        if checkpoint:
            start_step, saved_workers = _resume_training_state(parts, directory, engines_directory)
            resized = (
                f" (written by {saved_workers} workers, now {world}{': re-sharded' if universal else ''})"
                if saved_workers not in (None, world)
                else ""
            )
            logger.line(f"train: resumed at step {start_step} from {checkpoint.path}{resized}")
        elif continue_from:
            previous_step = continue_training_state(parts, directory, engines_directory)
            lr = parts.scheduler.get_last_lr()[0]
            logger.line(
                f"train: continuing from step {previous_step} of {continue_from}: decoder, EMA, "
                f"discriminator and both optimizers' state; LR {lr:.3g} at step 0"
            )
    engine, discriminator, ema = parts.generator, parts.discriminator, parts.ema
    if hooks is not None and hasattr(hooks, "started"):
        hooks.started(parts, rank, loop_config["output"])

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


def _resume_training_state(parts: Engines, directory: str, engines_directory: str) -> tuple[int, int | None]:
    """This run's own checkpoint in `directory` (engines from `engines_directory`): both engines whole (the
    LR schedule included) and the EMA. Returns (its step, the worker count that wrote it: None when the
    checkpoint predates that record)."""
    for name in ("generator", "discriminator"):
        path, _ = getattr(parts, name).load_checkpoint(os.path.join(engines_directory, name))
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {engines_directory}/{name}")
    state = torch.load(os.path.join(directory, "trainer_state.pt"), map_location="cpu", weights_only=True)
    parts.ema.load_state_dict(state["ema"])
    return int(state["step"]), state.get("workers")


def _checkpoint(engine, discriminator, ema, step: int, rank: int, metrics: dict, Checkpoint, config) -> None:
    import ray.train

    import infgen

    with tempfile.TemporaryDirectory() as directory:
        # Separate folders: each engine writes its own `latest` tag file.
        engine.save_checkpoint(os.path.join(directory, "generator"), tag=f"step{step}")
        discriminator.save_checkpoint(os.path.join(directory, "discriminator"), tag=f"step{step}")
        if rank == 0:
            state = {"ema": ema.state_dict(), "step": step, "workers": config.num_workers}
            torch.save(state, os.path.join(directory, "trainer_state.pt"))
            infgen.save(ema, os.path.join(directory, "ema_decoder"), {"step": step, "stage": config.stage})
        # Every rank reports (a barrier); Ray merges the ranks' folders into one persisted checkpoint.
        ray.train.report({"step": step, **metrics}, checkpoint=Checkpoint.from_directory(directory))
