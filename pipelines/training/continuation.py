"""What a training run starts from, checked on the driver before anything is written.

`--init-from DECODER`: a decoder folder (an `infgen.save` checkpoint, e.g. RUN/final_decoder). Its weights
only: the EMA starts from them, the discriminator and both optimizers start fresh, and the GAN starts at the
config's `loss.gan_start_step`.

`--continue-from RUN`: a finished training run's output folder (the `--output` of that run). The run goes on
from RUN's last Ray Train checkpoint: the decoder with DeepSpeed's fp32 master weights and AdamW moments, the
EMA, and the discriminator with its Adam moments (pipelines/training/loop.py, `continue_training_state`). The
hyperparameters are this run's (LR schedule, betas, weight decay, batch); the LR starts from where the
previous cosine ended rather than from zero (`optimizer.continued_warmup_steps`), and the GAN term is on from
step 0 when RUN trained its discriminator. Why the generator's moments carry: docs/paper.md, "Defaults where
the paper is silent".
"""

from __future__ import annotations

import dataclasses
import json

import fsspec

from pipelines.common.files import exists, read_json
from pipelines.common.stage_output import manifest_path

RECORD_NAME = "training.json"  # a training run's claim record (pipelines/training/stage.py)
DECODER_CONFIG = "config.json"  # what makes a folder an infgen.save checkpoint
# InfGenConfig fields that shape no weight: stage 1 and stage 2 latents differ in their in-distribution scale.
WEIGHT_FREE_MODEL_FIELDS = ("in_distribution_scale", "max_output_side")


@dataclasses.dataclass(frozen=True)
class Continuation:
    run: str  # the finished run's output folder
    checkpoint: str  # its last Ray Train checkpoint: generator/, discriminator/, trainer_state.pt
    step: int  # the step that checkpoint was taken at (the run's last)
    manifest: dict  # the run's manifest: its config and its decoder's config

    @property
    def trained_discriminator(self) -> bool:
        config = self.manifest["config"]
        return config["loss"]["gan_start_step"] < config["steps"]

    def record(self) -> dict:
        """What the continuing run records among its inputs."""
        return {"run": self.run, "checkpoint": self.checkpoint.rsplit("/", 1)[-1], "step": self.step}


def check_decoder_folder(path: str) -> None:
    """`--init-from` takes a decoder folder; a training run's folder is refused with the two right options."""
    if exists(f"{path}/{RECORD_NAME}"):
        raise ValueError(
            f"--init-from {path} is a training run's output folder, not a decoder folder: --continue-from "
            f"{path} continues that run (decoder, EMA, discriminator and optimizer state), --init-from "
            f"{path}/final_decoder starts from its decoder weights only"
        )
    if not exists(f"{path}/{DECODER_CONFIG}"):
        what = "does not exist" if not exists(path) else f"has no {DECODER_CONFIG}"
        raise FileNotFoundError(
            f"--init-from {path} {what}: it takes a decoder folder (an infgen.save checkpoint: "
            f"{DECODER_CONFIG} + model.safetensors, e.g. a run's final_decoder)"
        )


def find_continuation(run: str) -> Continuation:
    """The finished run at `run` and its last checkpoint; an error naming `run` and what is wrong."""
    run = run.rstrip("/")
    if not exists(run):
        raise FileNotFoundError(f"--continue-from {run} does not exist")
    if not exists(f"{run}/{RECORD_NAME}"):
        hint = (
            " it is a decoder folder: --init-from takes it (decoder weights only)"
            if exists(f"{run}/{DECODER_CONFIG}")
            else " it takes the --output folder of a finished `infgen train`"
        )
        raise ValueError(f"--continue-from {run} is not a training run's output (no {RECORD_NAME});{hint}")
    if not exists(manifest_path(run)):
        raise ValueError(
            f"--continue-from {run}: that training run has not finished (no manifest.json); rerun its "
            "command to finish it first"
        )
    manifest = read_json(manifest_path(run), "training manifest")
    if manifest.get("status") != "complete":
        raise ValueError(f"--continue-from {run}: its manifest.json has status {manifest.get('status')!r}")
    checkpoint, step = last_checkpoint(run)
    if step != manifest["config"]["steps"]:
        raise ValueError(
            f"--continue-from {run}: its last checkpoint ({checkpoint}) is at step {step}, "
            f"not at its last step {manifest['config']['steps']}"
        )
    return Continuation(run, checkpoint, step, manifest)


def last_checkpoint(run: str) -> tuple[str, int]:
    """The Ray Train checkpoint of `run` with the highest step (each one's ema_decoder/ records its step)."""
    filesystem, root = fsspec.core.url_to_fs(run)
    prefix = run[: len(run) - len(root)] if run.endswith(root) else ""
    found = []
    for sidecar in filesystem.glob(f"{root}/checkpoint_*/ema_decoder/{DECODER_CONFIG}"):
        step = read_json(prefix + sidecar, "checkpoint's EMA decoder").get("metadata", {}).get("step")
        folder = sidecar.rsplit("/", 2)[0]
        if step is not None and filesystem.exists(f"{folder}/trainer_state.pt"):
            found.append((int(step), prefix + folder))
    if not found:
        raise ValueError(
            f"--continue-from {run} holds no Ray Train checkpoint (checkpoint_*/ with trainer_state.pt and "
            "ema_decoder/)"
        )
    step, folder = max(found)
    return folder, step


def as_recorded(values: dict) -> dict:
    """As a manifest holds it: tuples become lists in JSON."""
    return json.loads(json.dumps(values))


def compatibility_problems(continuation: Continuation, config, decoder_config) -> list[str]:
    """Why this run's engines could not load the previous run's DeepSpeed checkpoints (empty: they can)."""
    previous, model = continuation.manifest["config"], continuation.manifest.get("model", {})
    problems = [
        f"decoder {key} {model.get(key)!r} there, {value!r} here"
        for key, value in as_recorded(decoder_config.to_dict()).items()
        if key not in WEIGHT_FREE_MODEL_FIELDS and model.get(key) != value
    ]
    discriminator = as_recorded(dataclasses.asdict(config.loss.discriminator))
    if previous["loss"]["discriminator"] != discriminator:
        problems.append(f"discriminator {previous['loss']['discriminator']} there, {discriminator} here")
    for name in ("precision", "zero_stage"):  # DeepSpeed's checkpoint layout follows both
        if previous[name] != getattr(config, name):
            problems.append(f"{name} {previous[name]!r} there, {getattr(config, name)!r} here")
    # The worker count may differ: a ZeRO-partitioned checkpoint is re-sharded (resharding.py).
    return problems


def check_compatible(continuation: Continuation, config, decoder_config) -> None:
    problems = compatibility_problems(continuation, config, decoder_config)
    if problems:
        raise ValueError(
            f"--continue-from {continuation.run}: cannot continue that run: {'; '.join(problems)}"
        )


def continued_config(config, continuation: Continuation):
    """The GAN term stays on from step 0 when the previous run trained the discriminator (it is not a
    fresh one that would wreck the decoder); otherwise the config's own start."""
    if continuation.trained_discriminator and config.loss.gan_start_step != 0:
        print(
            f"train: the discriminator of {continuation.run} is trained: the GAN term is on from step 0 "
            f"(not from gan_start_step {config.loss.gan_start_step})"
        )
        return config.with_gan_start(0)
    return config
