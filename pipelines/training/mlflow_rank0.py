"""What rank 0 records during training: progress lines, a per-step loss log (JSON lines, beside the Ray Train
run), MLflow metrics, and at the end the EMA decoder and a validation grid. Other ranks record nothing."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from infgen.images import to_uint8
from pipelines.common.grids import comparison_grid
from pipelines.training.validation import truth_name


class RankZeroLogger:
    def __init__(self, loop_config: dict, rank: int):
        self.active = rank == 0
        self.run_id = loop_config.get("mlflow_run_id")
        self.output = Path(loop_config["output"])
        self.validation_sizes = [tuple(size) for size in loop_config["validation_sizes"]]
        self.latent_geometry = loop_config.get("latent_geometry")
        self.validation = loop_config.get("validation_latents")  # held-out latents (.npz), or None
        self.client = None
        if self.active and self.run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(loop_config["tracking_uri"])

    def line(self, text: str) -> None:
        if self.active:
            print(text, flush=True)

    def step(self, step: int, metrics: dict, config) -> None:
        if not self.active:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        with open(self.output / "losses.jsonl", "a") as handle:  # a resumed step is appended again
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % config.print_every == 0 or step == config.steps - 1:
            shown = "  ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if k in ("total", "l1", "perceptual", "gan")
            )
            print(f"train: step {step}/{config.steps}  {shown}  lr {metrics['lr']:.3g}", flush=True)
        if self.client and step % config.log_every == 0:
            from mlflow.entities import Metric

            timestamp = int(1000 * time.time())
            batch = [Metric(name, float(value), timestamp, step) for name, value in metrics.items()]
            batch.append(Metric("progress.step", float(step), timestamp, step))  # what `infgen status` shows
            self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, ema, data, config) -> None:
        """Save the EMA decoder where the driver finds it, and log it with a validation grid to MLflow."""
        import infgen

        decoder_dir = self.output / "final_decoder"
        infgen.save(ema, decoder_dir, {"stage": config.stage, "steps": config.steps,
                                       "latents": self.latent_geometry})  # fmt: skip
        if not self.client:
            return
        self.client.log_artifacts(self.run_id, str(decoder_dir), "decoder")
        truths: dict[str, np.ndarray] = {}
        if self.validation:  # images the latent stage held out: never trained on
            with np.load(self.validation) as saved:
                latents = torch.from_numpy(saved["latents"])
                truths = {name: saved[name] for name in saved.files if name.startswith("truth_")}
                self.client.set_tag(self.run_id, "infgen.validation_keys", ",".join(saved["keys"].tolist()))
        else:  # nothing held out: the first training batch, and the run says so
            latents, _ = data.batch(0, 0, 1)
            latents = latents[: min(2, len(latents))]
            self.client.set_tag(self.run_id, "infgen.validation_keys", "none held out: training latents")
        latents = latents.to(next(ema.parameters()).device)
        with torch.no_grad(), tempfile.TemporaryDirectory() as scratch:
            for height, width in self.validation_sizes:
                images = infgen.decode(ema, latents, (height, width)).cpu()  # (B, 3, H, W) in [-1, 1]
                decoded = [to_uint8(image) for image in images]
                path = Path(scratch) / f"validation_{height}x{width}.png"
                Image.fromarray(validation_grid(decoded, truths.get(truth_name((height, width))))).save(path)
                self.client.log_artifact(self.run_id, str(path), "validation")


def validation_grid(decoded: list[np.ndarray], truths: np.ndarray | None) -> np.ndarray:
    """One row per validation image: truth | InfGen when the truth at this size was kept (validation.py),
    else the decode alone, labelled so; each row with its zoomed centre beneath."""
    if truths is None:  # training latents, or validation latents written before truths were kept
        return comparison_grid([[image] for image in decoded], ["InfGen (no truth kept)"])
    return comparison_grid([[truth, image] for truth, image in zip(truths, decoded, strict=True)],
                           ["truth", "InfGen"])  # fmt: skip
