"""FrozenVAE, the synthetic image generator and the embedded (offline substitute) VAE, on tiny CPU models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_VAE_SCALING_FACTOR as SCALING_FACTOR
from conftest import TINY_VAE_SHIFT_FACTOR as SHIFT_FACTOR

import infgen.substitutes.embedded_vae as embedded
import infgen.substitutes.train_vae as train_vae
from infgen.substitutes.synthetic import make_image, make_images
from infgen.vae import FrozenVAE


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One torch thread: these models are tiny, and on a busy 2-core machine a second OpenMP thread that
    spin-waits for a core made each call ~100× slower (3 s instead of 10 ms) in measurements here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae_directory(tiny_vae_directory):
    return tiny_vae_directory


@pytest.fixture(scope="module")
def vae(vae_directory):
    return FrozenVAE.load(vae_directory)


def random_images(batch=2, height=32, width=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


# ---- loading ----


def test_load_reads_config_and_freezes(vae, vae_directory):
    assert vae.source == str(vae_directory)
    assert vae.scaling_factor == pytest.approx(SCALING_FACTOR)
    assert vae.shift_factor == pytest.approx(SHIFT_FACTOR)
    assert vae.latent_channels == 4
    assert vae.downsample_factor == 8
    assert not vae.autoencoder.training
    assert not any(parameter.requires_grad for parameter in vae.autoencoder.parameters())


def test_load_detects_pipeline_directory(vae_directory, tmp_path):
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    for file in vae_directory.iterdir():
        (pipeline / "vae" / file.name).write_bytes(file.read_bytes())
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    loaded = FrozenVAE.load(pipeline)

    assert loaded.source == str(pipeline / "vae")
    assert loaded.scaling_factor == pytest.approx(SCALING_FACTOR)


@pytest.mark.parametrize("relative", [False, True])
def test_missing_local_path_raises_file_not_found(tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    missing = "./no_such_vae" if relative else str(tmp_path / "no_such_vae")
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        FrozenVAE.load(missing)


def test_directory_without_config_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        FrozenVAE.load(tmp_path)


# ---- encode / decode ----


def test_encode_is_scaled_shifted_posterior_mean(vae):
    images = random_images()
    expected = (vae.autoencoder.encode(images).latent_dist.mean - SHIFT_FACTOR) * SCALING_FACTOR

    latents = vae.encode(images)

    assert latents.shape == (2, 4, 4, 4)
    torch.testing.assert_close(latents, expected.detach())
    torch.testing.assert_close(vae.encode(images), latents)  # the mean is deterministic


def test_sampled_encode_is_reproducible_with_a_seeded_generator(vae):
    images = random_images()

    first = vae.encode(images, generator=torch.Generator().manual_seed(7), sample=True)
    again = vae.encode(images, generator=torch.Generator().manual_seed(7), sample=True)
    other = vae.encode(images, generator=torch.Generator().manual_seed(8), sample=True)

    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, vae.encode(images))


@pytest.mark.parametrize(("height", "width"), [(17, 30), (8, 9), (33, 64)])
def test_sides_not_multiple_of_8_give_ceil_latent_grid(vae, height, width):
    latents = vae.encode(random_images(1, height, width))

    expected_grid = (-(-height // 8), -(-width // 8))
    assert latents.shape[-2:] == expected_grid == vae.latent_size(height, width)


def test_decode_inverts_the_scaling_and_clamps(vae):
    latents = vae.encode(random_images())

    images = vae.decode(latents)

    assert images.shape == (2, 3, 32, 32)
    assert images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    raw = vae.autoencoder.decode(latents / SCALING_FACTOR + SHIFT_FACTOR).sample.clamp(-1, 1)
    torch.testing.assert_close(images, raw.detach())


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(3, 16, 16), "4-D"),
        (torch.zeros(1, 1, 16, 16), "3 channels"),
        (torch.zeros(1, 3, 0, 16), "non-empty"),
        (torch.full((1, 3, 16, 16), float("nan")), "NaN"),
        (torch.full((1, 3, 16, 16), 255.0), r"\[-1, 1\]"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_images_raise_value_error_naming_the_problem(vae, images, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(images)


def test_bad_latents_raise_value_error(vae):
    with pytest.raises(ValueError, match="4-D"):
        vae.decode(torch.zeros(1, 3, 4, 4))  # 3 channels, the VAE has 4
    with pytest.raises(ValueError, match="NaN"):
        vae.decode(torch.full((1, 4, 4, 4), float("nan")))


# ---- synthetic images ----


def test_synthetic_images_are_deterministic_per_seed_and_differ_across_seeds():
    first = make_image(3, 48, 80)

    assert first.shape == (48, 80, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, make_image(3, 48, 80))
    assert np.abs(first.astype(int) - make_image(4, 48, 80)).mean() > 10
    assert first.std() > 5  # not a flat colour


def test_make_images_stacks_seeds():
    batch = make_images([1, 2], (24, 40))

    assert batch.shape == (2, 24, 40, 3)
    np.testing.assert_array_equal(batch[1], make_image(2, 24, 40))


# ---- the shipped substitute VAE and its reproduction script ----


def test_shipped_substitute_vae_loads_and_says_what_it_is():
    log = []

    vae = embedded.embedded_vae(log=log.append)

    assert any("OFFLINE SUBSTITUTE" in line for line in log)
    assert vae.source == str(embedded.WEIGHTS_DIR)
    assert vae.latent_channels == 4 and vae.downsample_factor == 8
    # no mid-block attention: InfGen's pixel decoder warm-starts from this decoder layer for layer
    assert not vae.autoencoder.config.mid_block_add_attention
    report = embedded.embedded_vae_report()
    assert vae.scaling_factor == pytest.approx(report["scaling_factor"])
    assert vae.encode(random_images(1, 24, 24)).shape == (1, 4, 3, 3)


def test_shipped_substitute_vae_reconstructs_held_out_photographs():
    """The issue's bar: ≥ 22 dB on real photographs at 128² that the VAE never trained on."""
    from infgen.substitutes import photographs

    assert not {p.name for p in photographs.HELD_OUT} & set(
        embedded.embedded_vae_report()["recipe"]["training_photographs"]
    )
    photos = train_vae.holdout_photographs(128)

    psnr = train_vae.reconstruction_psnr(embedded.embedded_vae(log=lambda _: None).autoencoder, photos)

    assert psnr >= 22.0
    assert psnr == pytest.approx(embedded.embedded_vae_report()["held_out_photograph_psnr_db"], abs=0.05)


def test_reproduction_script_trains_and_writes_loadable_weights(tmp_path, monkeypatch):
    from infgen.substitutes import photographs

    monkeypatch.setattr(train_vae, "SYNTHETIC_IMAGES", 2)
    monkeypatch.setattr(train_vae, "SYNTHETIC_SIDE_RANGE", (64, 80))
    monkeypatch.setattr(train_vae, "BATCH_SIZE", 2)
    monkeypatch.setattr(train_vae, "HOLDOUT_SYNTHETIC", 1)
    monkeypatch.setattr(photographs, "TRAINING", photographs.TRAINING[:1])  # scikit-image's: installed here

    train_vae.main(["--output", str(tmp_path / "weights"), "--steps", "2", "--threads", "1"])

    vae = FrozenVAE.load(tmp_path / "weights")
    report = json.loads((tmp_path / "weights" / train_vae.RECIPE_FILE).read_text())
    assert report["recipe"]["steps"] == 2
    assert vae.scaling_factor == pytest.approx(report["scaling_factor"])
    assert [path.name for path in tmp_path.iterdir()] == ["weights"]  # no temporary folder left behind


def test_average_pool_init_starts_as_an_8x8_average_pool_codec():
    from diffusers import AutoencoderKL

    autoencoder = AutoencoderKL(**train_vae.AUTOENCODER_CONFIG)
    train_vae._average_pool_init(autoencoder)
    images = random_images(2, 32, 48)

    with torch.no_grad():
        posterior = autoencoder.encode(images).latent_dist
        reconstruction = autoencoder.decode(posterior.mean).sample

    pooled = torch.nn.functional.avg_pool2d(images, 8)  # (2, 3, 4, 6)
    torch.testing.assert_close(posterior.mean[:, :3], pooled, atol=0.02, rtol=0)
    expected = torch.nn.functional.interpolate(pooled, scale_factor=8, mode="nearest")
    torch.testing.assert_close(reconstruction, expected, atol=0.05, rtol=0)
    assert posterior.std.max() < 0.01  # near-deterministic from the start
