"""Latent source (c) of the evaluation: a local diffusers pipeline. A tiny DiTPipeline with random weights is
saved with save_pretrained (the real on-disk format) and sampled through `diffusers_latents`; the latents it
returns must be in the scaled convention, i.e. decode, as the pipeline itself decodes, to the pipeline's own
images for the same seed."""

import numpy as np
import pytest
import torch

from pipelines.evaluation.sources import diffusers_latents

SAMPLES, STEPS = 3, 2


@pytest.fixture(scope="module")
def dit_pipeline_directory(tiny_vae_directory, tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, norm_num_groups=4,
    )  # fmt: skip
    vae = AutoencoderKL.from_pretrained(tiny_vae_directory)
    pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    directory = tmp_path_factory.mktemp("dit_pipeline")
    pipeline.save_pretrained(directory)
    return directory


def test_sampled_latents_are_scaled_and_decode_to_the_pipelines_own_images(dit_pipeline_directory):
    from diffusers import DiffusionPipeline

    latents = diffusers_latents(str(dit_pipeline_directory), SAMPLES, seed=7, num_inference_steps=STEPS)
    assert latents.shape == (SAMPLES, 4, 8, 8) and latents.dtype == np.float32
    assert np.isfinite(latents).all()

    pipeline = DiffusionPipeline.from_pretrained(dit_pipeline_directory, local_files_only=True)
    generator = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 1000, (SAMPLES,), generator=generator).tolist()  # as diffusers_latents draws
    images = pipeline(class_labels=labels, generator=generator, num_inference_steps=STEPS, output_type="pt")
    scaling = pipeline.vae.config.scaling_factor
    with torch.no_grad():
        decoded = pipeline.vae.decode(torch.from_numpy(latents) / scaling).sample
    assert torch.allclose((decoded / 2 + 0.5).clamp(0, 1), images.images, atol=1e-5)


def test_a_pipeline_that_is_not_local_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        diffusers_latents(str(tmp_path / "facebook/DiT-XL-2-256"), 2, seed=0)


def test_sampling_in_batches_keeps_each_sample_and_reports_progress(dit_pipeline_directory):
    labels, lines = [3, 14, 15], []
    directory = str(dit_pipeline_directory)
    batched = diffusers_latents(directory, 3, seed=5, device="cpu", batch_size=2, progress=lines.append,
                                class_labels=labels, num_inference_steps=STEPS)  # fmt: skip
    first = diffusers_latents(directory, 2, seed=5, device="cpu", batch_size=2, class_labels=labels[:2],
                              num_inference_steps=STEPS)  # fmt: skip
    assert batched.shape == (3, 4, 8, 8)
    assert np.array_equal(batched[:2], first)  # the first batch is the first two samples, in order
    assert [line.split(" latents")[0] for line in lines] == ["evaluate: sampled 2/3", "evaluate: sampled 3/3"]
