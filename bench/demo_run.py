"""Shared by the benchmarks that read a finished workflow run (runs/demo): its latent record, frozen VAE and
held-out images, as the evaluation's held-out source picks them."""

from __future__ import annotations

from pipelines.common.holdout import held_out_images
from pipelines.common.latent_record import read_latent_record
from pipelines.common.reconstruction import read_images
from pipelines.common.vae_source import load_frozen_vae


def held_out_of_run(run: str, count: int):
    """(latent record, frozen VAE on CPU, up to `count` held-out images) of the workflow run folder `run`."""
    run = run.rstrip("/")
    record = read_latent_record(f"{run}/latents")
    vae, _ = load_frozen_vae(record.vae, "cpu")
    pictures = read_images(held_out_images(f"{run}/ingest/images", f"{run}/latents", count))
    return record, vae, pictures
