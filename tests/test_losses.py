"""Loss functions, DecoderLoss, offline LPIPS loading and the PatchGAN discriminator (CPU, no network)."""

import logging
import re

import pytest
import torch
import torchvision

from infgen.discriminator import DiscriminatorConfig, NLayerDiscriminator
from infgen.losses import (
    DecoderLoss,
    LossConfig,
    gan_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    random_crop_pair,
)
from infgen.metrics.perceptual import TRUNK_ENV_VAR, TRUNKS, default_trunk_path, load_lpips

ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)  # conv layers in torchvision's alexnet().features


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty torch cache and no env override, so nothing real on this machine is found."""
    monkeypatch.delenv(TRUNK_ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


@pytest.fixture(scope="module")
def alexnet_state_path(tmp_path_factory):
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("trunk") / TRUNKS["alex"][1]
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def perceptual(alexnet_state_path):
    return load_lpips(alexnet_state_path)


def make_loss(perceptual, **overrides):
    settings = dict(
        l1_weight=1.0,
        perceptual_weight=0.5,  # distinct weights, so a swapped weight shows in the total
        gan_weight=0.25,
        gan_start_step=10,
        perceptual_crop=64,
        discriminator=DiscriminatorConfig(base_channels=16, norm_groups=8),
    )
    settings.update(overrides)
    torch.manual_seed(0)
    return DecoderLoss(LossConfig(**settings), perceptual=perceptual)


def make_images(height=96, width=80):
    generator = torch.Generator().manual_seed(7)
    prediction = torch.rand(2, 3, height, width, generator=generator) * 2 - 1
    target = torch.rand(2, 3, height, width, generator=generator) * 2 - 1
    return prediction.requires_grad_(True), target


# ---- pure functions


def test_hinge_discriminator_loss_matches_hand_computation():
    logits_real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2] → mean 5/6
    logits_fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2]   → mean 1
    expected = 0.5 * (5 / 6 + 1)
    assert hinge_discriminator_loss(logits_real, logits_fake).item() == pytest.approx(expected)


def test_hinge_discriminator_loss_is_zero_when_margins_are_met():
    logits_real, logits_fake = torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -1.0)
    assert hinge_discriminator_loss(logits_real, logits_fake).item() == 0.0


def test_hinge_generator_loss_is_negative_mean_fake_logit():
    assert hinge_generator_loss(torch.tensor([-2.0, 0.0, 1.0, 3.0])).item() == pytest.approx(-0.5)


def test_gan_weight_switches_on_at_start_step():
    assert gan_weight(0, 100, 0.1) == 0.0
    assert gan_weight(99, 100, 0.1) == 0.0
    assert gan_weight(100, 100, 0.1) == 0.1
    assert gan_weight(10_000, 100, 0.1) == 0.1


def test_random_crop_pair_takes_the_same_window_from_both():
    image = torch.arange(2 * 3 * 40 * 50, dtype=torch.float32).reshape(2, 3, 40, 50)
    target = image + 1000.0
    crop_prediction, crop_target = random_crop_pair(image, target, 16, torch.Generator().manual_seed(3))
    assert crop_prediction.shape == (2, 3, 16, 16)
    assert torch.equal(crop_target, crop_prediction + 1000.0)
    top, left = divmod(int(crop_prediction[0, 0, 0, 0].item()), 50)  # arange encodes the position
    assert torch.equal(crop_prediction, image[..., top : top + 16, left : left + 16])


def test_random_crop_pair_is_seeded():
    image = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64)

    def corner(seed):
        crop, _ = random_crop_pair(image, image.clone(), 8, torch.Generator().manual_seed(seed))
        return crop[0, 0, 0, 0].item()

    assert corner(5) == corner(5)
    assert len({corner(seed) for seed in range(10)}) > 1  # a different seed moves the window


def test_random_crop_pair_leaves_small_images_and_short_sides_alone():
    prediction, target = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    same_prediction, same_target = random_crop_pair(prediction, target, 32)
    assert same_prediction is prediction and same_target is target
    wide_prediction, _ = random_crop_pair(torch.zeros(1, 3, 20, 100), torch.zeros(1, 3, 20, 100), 32)
    assert wide_prediction.shape == (1, 3, 20, 32)


def test_random_crop_pair_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in size"):
        random_crop_pair(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9), 4)


# ---- DecoderLoss


def test_generator_loss_before_gan_start(perceptual):
    loss = make_loss(perceptual)
    discriminator_calls = []
    loss.discriminator.register_forward_pre_hook(lambda module, args: discriminator_calls.append(1))
    prediction, target = make_images()
    terms = loss.generator_loss(prediction, target, step=9)
    assert set(terms) == {"l1", "perceptual", "gan", "total"}
    assert terms["gan"].item() == 0.0
    assert discriminator_calls == []  # D is not even run
    assert terms["l1"].item() == pytest.approx((prediction - target).abs().mean().item())
    assert terms["perceptual"].item() > 0
    assert torch.allclose(terms["total"], terms["l1"] + 0.5 * terms["perceptual"])


def test_generator_loss_after_gan_start_is_weighted_sum_and_reaches_prediction(perceptual):
    loss = make_loss(perceptual)
    prediction, target = make_images()
    terms = loss.generator_loss(prediction, target, step=10, generator=torch.Generator().manual_seed(0))
    assert terms["gan"].item() != 0.0
    expected = 1.0 * terms["l1"] + 0.5 * terms["perceptual"] + 0.25 * terms["gan"]
    assert torch.allclose(terms["total"], expected)
    terms["total"].backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in loss.discriminator.parameters())
    assert all(parameter.grad is None for parameter in loss.perceptual.parameters())


def test_gan_term_gradient_flows_through_discriminator_into_prediction(perceptual):
    loss = make_loss(perceptual, l1_weight=0.0, perceptual_weight=0.0)  # isolate the GAN path
    prediction, target = make_images()
    loss.generator_loss(prediction, target, step=10)["total"].backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0


def test_discriminator_loss_trains_d_but_not_the_prediction(perceptual):
    loss = make_loss(perceptual)
    prediction, target = make_images()
    terms = loss.discriminator_loss(prediction, target, step=10, generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"discriminator", "logits_real", "logits_fake"}
    assert terms["discriminator"].item() > 0
    terms["discriminator"].backward()
    assert prediction.grad is None
    assert all(parameter.grad.abs().sum() > 0 for parameter in loss.discriminator.parameters())


def test_discriminator_loss_before_gan_start_is_a_backpropagatable_zero(perceptual):
    loss = make_loss(perceptual)
    prediction, target = make_images()
    terms = loss.discriminator_loss(prediction, target, step=0)
    assert terms["discriminator"].item() == 0.0
    assert terms["logits_real"].item() == 0.0 and terms["logits_fake"].item() == 0.0
    terms["discriminator"].backward()
    assert prediction.grad is None
    assert all(torch.count_nonzero(parameter.grad) == 0 for parameter in loss.discriminator.parameters())


def test_decoder_loss_keeps_lpips_frozen_in_train_mode(perceptual):
    loss = make_loss(perceptual).train()
    assert loss.discriminator.training
    assert not loss.perceptual.training
    assert not any(parameter.requires_grad for parameter in loss.perceptual.parameters())
    assert loss.trunk_is_pretrained


# ---- LPIPS loading


def test_load_lpips_without_weights_warns_about_random_trunk(offline_torch_home, caplog):
    with caplog.at_level(logging.WARNING, logger="infgen.metrics.perceptual"):
        model = load_lpips()
    assert model.trunk_is_pretrained is False
    assert not model.training
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "RANDOM" in messages and "NOT comparable" in messages
    assert str(default_trunk_path("alex")) in messages  # says where to put the weights
    assert str(offline_torch_home) in str(default_trunk_path("alex"))


def test_random_trunk_is_the_same_in_every_process_and_leaves_the_rng_alone(offline_torch_home):
    # Ray workers each build their own LPIPS: without weights their values must still be comparable.
    torch.manual_seed(1)
    first = load_lpips()
    after_first = torch.rand(1)
    torch.manual_seed(2)
    second = load_lpips()
    for a, b in zip(first.net.parameters(), second.net.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first)  # building it drew nothing from the caller's generator


def assert_trunk_equals(model, path):
    saved = torch.load(path, weights_only=True)
    # lpips names each slice's children by their index in torchvision's `features`
    trunk_layers = {
        int(name): layer for part in model.net.children() for name, layer in part.named_children()
    }
    for index in ALEXNET_CONV_INDICES:
        assert torch.equal(trunk_layers[index].weight, saved[f"features.{index}.weight"])
        assert torch.equal(trunk_layers[index].bias, saved[f"features.{index}.bias"])


def test_load_lpips_loads_trunk_from_explicit_path(alexnet_state_path, offline_torch_home, caplog):
    with caplog.at_level(logging.WARNING, logger="infgen.metrics.perceptual"):
        model = load_lpips(alexnet_state_path)
    assert model.trunk_is_pretrained is True
    assert caplog.records == []
    assert_trunk_equals(model, alexnet_state_path)
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_load_lpips_finds_trunk_via_env_var_then_cache(alexnet_state_path, offline_torch_home, monkeypatch):
    monkeypatch.setenv(TRUNK_ENV_VAR, str(alexnet_state_path))
    assert_trunk_equals(load_lpips(), alexnet_state_path)
    monkeypatch.delenv(TRUNK_ENV_VAR)
    cached = default_trunk_path("alex")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(alexnet_state_path.read_bytes())
    model = load_lpips()
    assert model.trunk_is_pretrained is True
    assert_trunk_equals(model, cached)


def test_load_lpips_missing_path_raises_naming_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "alexnet.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_lpips(missing)
    monkeypatch.setenv(TRUNK_ENV_VAR, str(missing))  # a configured but wrong env var is an error too
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_lpips()


def test_load_lpips_wrong_keys_raise_naming_the_path(tmp_path):
    no_features = tmp_path / "classifier_only.pth"
    torch.save({"classifier.1.weight": torch.zeros(4, 4)}, no_features)
    with pytest.raises(ValueError, match=re.escape(str(no_features)) + ".*features"):
        load_lpips(no_features)
    wrong_shape = tmp_path / "wrong_shape.pth"
    state = torchvision.models.alexnet().state_dict()
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, wrong_shape)
    with pytest.raises(ValueError, match=re.escape(str(wrong_shape))):
        load_lpips(wrong_shape)


# ---- discriminator


@pytest.mark.parametrize("side, patches", [(64, 6), (256, 30)])
def test_discriminator_outputs_a_patch_map(side, patches):
    discriminator = NLayerDiscriminator()
    logits = discriminator(torch.randn(2, 3, side, side))
    assert logits.shape == (2, 1, patches, patches)


def test_discriminator_has_about_2_8m_parameters_at_defaults():
    count = sum(parameter.numel() for parameter in NLayerDiscriminator().parameters())
    convs = (3 * 64 * 16 + 64) + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + (512 * 16 + 1)
    norms = 2 * (128 + 256 + 512)
    assert count == convs + norms
    assert 2.7e6 < count < 2.9e6


def test_discriminator_output_for_an_image_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    discriminator = NLayerDiscriminator(DiscriminatorConfig(base_channels=16, norm_groups=8))
    images = torch.randn(3, 3, 64, 64)
    alone = discriminator(images[:1])
    in_batch = discriminator(images)[:1]
    assert torch.allclose(alone, in_batch, atol=1e-6)


def test_discriminator_config_rejects_groups_that_do_not_divide_widths():
    with pytest.raises(ValueError, match="norm_groups"):
        DiscriminatorConfig(base_channels=12, norm_groups=32)
