"""The pixel decoder starts as the frozen VAE's decoder: at 1× the untrained model decodes as the VAE does."""

from __future__ import annotations

import pytest
import torch

import infgen
from infgen.substitutes.embedded_vae import embedded_vae
from infgen.substitutes.train_vae import holdout_synthetic
from infgen.warm_start import warm_start_pixel_decoder


@pytest.fixture(scope="module")
def vae():
    return embedded_vae(log=lambda _: None)


@pytest.fixture(scope="module")
def images():
    return holdout_synthetic()[:4]  # (4, 3, 128, 128): scenes no training run saw


def psnr(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    mse = (prediction.clamp(-1, 1) - truth).square().mean(dim=(1, 2, 3))
    return float((10 * torch.log10(4.0 / mse)).mean())


def test_untrained_model_decodes_at_1x_as_the_stock_decoder_does(vae, images):
    latents = vae.encode(images)
    torch.manual_seed(0)
    model = infgen.InfGen(infgen.preset("tiny"))
    cold = model(latents, (128, 128)).detach()

    warm_start_pixel_decoder(model, vae, latents)

    with torch.no_grad():
        warm = model(latents, (128, 128))
    stock = vae.decode(latents)
    assert psnr(warm, stock) > 40  # the same decoder, up to frozen GroupNorm statistics and edge padding
    assert abs(psnr(warm, images) - psnr(stock, images)) < 0.2
    assert psnr(cold, images) < psnr(stock, images) - 10  # without the warm start it decodes nothing useful


def test_chunked_and_tiled_decodes_stay_exact_after_a_warm_start(vae, images):
    latents = vae.encode(images[:1])
    model = infgen.InfGen(infgen.preset("tiny"))
    warm_start_pixel_decoder(model, vae, latents)
    with torch.no_grad():
        whole = model(latents, (200, 136))
        pieces = model(latents, (200, 136), query_chunk=50, tile_cells=5)
    assert (whole - pieces).abs().max().item() <= 1e-4


def test_a_decoder_of_another_shape_is_refused_with_the_reason(vae, images):
    model = infgen.InfGen(infgen.preset("tiny", decoder=infgen.preset("base").decoder))
    with pytest.raises(ValueError, match=r"widths \(64, 128, 256, 256\) vs the VAE's \(16, 32, 64, 64\)"):
        warm_start_pixel_decoder(model, vae, vae.encode(images[:1]))
