"""infgen.metrics.inception and .distribution against clean-fid 0.1.35, analytic values and a forward hook.

NVIDIA's inception-2015-12-05.pt is not available offline, so the network here is the labelled substitute.
What is checked does not depend on the weights: that our preprocessing and Fréchet distance give clean-fid's
FID (the same network passed to clean-fid's `compute_fid` as `custom_feat_extractor`), that KID is
clean-fid's, that sFID features are mixed_6/conv's first 7 channels in TF's NHWC order, and that a TorchScript
laid out like NVIDIA's (a `layers` chain of TF-named stages, `layers.mixed_6.conv`) is loaded and taken apart
correctly.
"""

from __future__ import annotations

import collections
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid import fid as clean_fid
from cleanfid.resize import make_resizer
from PIL import Image
from torch import nn

from infgen.metrics import inception
from infgen.metrics.distribution import (
    extract_patches,
    frechet_distance,
    kernel_inception_distance,
    patch_boxes,
    precision_recall,
)

IMAGES_PER_SET = 10  # few and small: every image costs an Inception forward at 299×299 on CPU
IMAGE_SIDE = 64


def smooth_image(generator: np.random.Generator) -> np.ndarray:
    """A colour gradient with mild noise, (64, 64, 3) uint8."""
    y, x = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE] / (IMAGE_SIDE - 1)
    corners = generator.uniform(0, 255, (3, 3))
    image = corners[:, 0, None, None] + (corners[:, 1] - corners[:, 0])[:, None, None] * x
    image = image + 0.5 * (corners[:, 2] - corners[:, 0])[:, None, None] * y
    image = image.transpose(1, 2, 0) + generator.normal(0, 4, (IMAGE_SIDE, IMAGE_SIDE, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def striped_image(generator: np.random.Generator) -> np.ndarray:
    """Oriented stripes of random frequency with strong noise, (64, 64, 3) uint8."""
    y, x = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE]
    frequency, angle = generator.uniform(0.2, 0.8), generator.uniform(0, np.pi)
    wave = np.sin(frequency * (x * np.cos(angle) + y * np.sin(angle)))
    image = (
        generator.uniform(0, 255, 3)
        + 100 * wave[..., None]
        + generator.normal(0, 20, (IMAGE_SIDE, IMAGE_SIDE, 3))
    )
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Small batches on a shared 2-core machine: a second torch thread mostly waits for the first."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def substitute(tmp_path_factory):
    """load_inception() with no weights anywhere, plus the warnings and log records it emitted."""
    absent = tmp_path_factory.mktemp("no_weights") / inception.WEIGHTS_FILE_NAME
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(inception.__name__).addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            patch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)
            patch.setattr(inception, "default_weights_path", lambda: absent)
            extractor = inception.load_inception(batch_size=IMAGES_PER_SET)
    finally:
        logging.getLogger(inception.__name__).removeHandler(handler)
    return extractor, list(caught), records


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """Two folders of different synthetic images as PNG (lossless), and the same images as uint8 arrays."""
    generator = np.random.default_rng(0)
    sets = {
        "smooth": np.stack([smooth_image(generator) for _ in range(IMAGES_PER_SET)]),
        "striped": np.stack([striped_image(generator) for _ in range(IMAGES_PER_SET)]),
    }
    folders = {}
    for name, images in sets.items():
        folder = tmp_path_factory.mktemp(name)
        for index, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{index:02d}.png")  # clean-fid sorts names: same order
        folders[name] = folder
    return folders, sets


@pytest.fixture(scope="module")
def our_features(substitute, image_folders):
    """Our features of both image sets, computed once (each image costs ~0.5 CPU-second)."""
    return {name: substitute[0](images) for name, images in image_folders[1].items()}


# clean-fid's Fréchet distance takes scipy's sqrtm of a D×D matrix: minutes at D = 2048 on a busy 2-core
# machine. The FID comparison therefore runs on the first 128 pool_3 dimensions (a fixed linear map of the
# features, so still a comparison of the whole pipeline); the full 2048-dimensional features are compared
# element by element, and test_frechet_distance_equals_clean_fid_and_analytic_values compares the distance
# itself.
FID_DIMENSIONS = 128


class RecordingModule(nn.Module):
    """clean-fid's extractor: records what `module` returned per batch, hands on the first FID_DIMENSIONS."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.outputs: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.module(images)
        self.outputs.append(output.clone())
        return output[:, :FID_DIMENSIONS]


# 10 samples in 128 dimensions: singular covariances, as expected here; clean-fid also passes scipy's old
# `disp`.
@pytest.mark.filterwarnings("ignore:Matrix is singular", "ignore:The `disp` argument is deprecated")
def test_fid_equals_clean_fid_compute_fid(substitute, image_folders, our_features):
    folders = image_folders[0]
    ours_fid = frechet_distance(
        our_features["smooth"]["pool"][:, :FID_DIMENSIONS],
        our_features["striped"]["pool"][:, :FID_DIMENSIONS],
    )
    recording = RecordingModule(substitute[0].clean_fid_module())
    their_fid = clean_fid.compute_fid(
        str(folders["smooth"]),
        str(folders["striped"]),
        mode="clean",
        custom_feat_extractor=recording,
        device=torch.device("cpu"),
        num_workers=0,
        batch_size=IMAGES_PER_SET,
        verbose=False,
    )
    # Same network on both sides, so any difference comes from preprocessing or from the distance. Measured on
    # these images: a bilinear resize instead of clean-fid's bicubic one moves this FID (~36) by ~3, rounding
    # the resized images to 8 bits by ~0.1.
    assert len(recording.outputs) == 2  # one batch per folder, smooth first
    np.testing.assert_allclose(
        our_features["smooth"]["pool"], recording.outputs[0].numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        our_features["striped"]["pool"], recording.outputs[1].numpy(), rtol=1e-5, atol=1e-6
    )
    assert their_fid > 10.0  # clearly different image sets
    assert abs(ours_fid - their_fid) < 1e-3


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
def test_frechet_distance_equals_clean_fid_and_analytic_values():
    generator = np.random.default_rng(1)
    features_a = generator.normal(size=(400, 6)) @ generator.normal(size=(6, 6))
    features_b = generator.normal(size=(300, 6)) * np.arange(1, 7) + 0.5
    expected = clean_fid.fid_from_feats(features_a, features_b)
    assert frechet_distance(features_a, features_b) == pytest.approx(expected, rel=1e-10)
    assert expected > 1.0

    assert frechet_distance(features_a, features_a) == pytest.approx(0.0, abs=1e-8)
    # Equal covariances: only the means differ, and the distance is the squared mean shift.
    shift = np.array([0.3, -1.0, 2.0, 0.0, 0.5, 1.5])
    assert frechet_distance(features_a, features_a + shift) == pytest.approx(float(shift @ shift), rel=1e-7)


def test_frechet_distance_rejects_bad_input():
    good = np.zeros((5, 3))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(np.zeros(5), good)
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(good, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), good)
    with pytest.raises(ValueError, match="NaN or infinite"):
        frechet_distance(np.full((5, 3), np.nan), good)


def test_kid_equals_clean_fid_kernel_distance():
    generator = np.random.default_rng(2)
    features_a = generator.normal(size=(60, 16))
    features_b = generator.normal(loc=0.3, size=(50, 16))
    saved_state = np.random.get_state()
    try:
        # Subsets: clean-fid draws from the global RNG; seeding it with our seed gives the same subsets.
        np.random.seed(7)
        expected = clean_fid.kernel_distance(features_a, features_b, num_subsets=10, max_subset_size=20)
        ours = kernel_inception_distance(features_a, features_b, num_subsets=10, max_subset_size=20, seed=7)
        assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert expected > 1e-3  # the sets differ
        assert kernel_inception_distance(features_a, features_b, 10, 20, seed=8) != pytest.approx(
            ours, rel=1e-6
        )
        # One subset of all the points: a permutation, which the estimate is invariant to, so any RNG state
        # works.
        np.random.seed(123)
        whole = clean_fid.kernel_distance(features_a[:50], features_b, num_subsets=1, max_subset_size=1000)
        assert kernel_inception_distance(features_a[:50], features_b, 1, 1000, seed=0) == pytest.approx(
            whole, rel=1e-9
        )
    finally:
        np.random.set_state(saved_state)


def test_precision_recall_on_gaussian_clouds():
    generator = np.random.default_rng(3)
    real = generator.normal(size=(2000, 2))
    same = generator.normal(size=(2000, 2))
    precision, recall = precision_recall(real, same, k=3)
    assert precision > 0.8 and recall > 0.8

    far = generator.normal(size=(2000, 2)) + 100.0
    assert precision_recall(real, far, k=3) == (0.0, 0.0)

    # Mode dropping: real has two well-separated blobs, fake only the first.
    two_blobs = np.concatenate([generator.normal(size=(1000, 2)) - 20, generator.normal(size=(1000, 2)) + 20])
    one_blob = generator.normal(size=(2000, 2)) - 20
    precision, recall = precision_recall(two_blobs, one_blob, k=3)
    assert precision > 0.9
    assert 0.4 < recall < 0.55  # about half of the real points, minus the fringe of the kept blob

    # Chunking is only a memory bound: any chunk size gives the same answer.
    assert precision_recall(two_blobs, one_blob, k=3, chunk_size=7) == (precision, recall)


def test_spatial_features_are_mixed_6d_branch1x1_first_7_channels(substitute, image_folders, our_features):
    extractor = substitute[0]
    assert our_features["striped"]["spatial"].shape == (IMAGES_PER_SET, 2023)
    assert our_features["striped"]["pool"].shape == (IMAGES_PER_SET, 2048)
    assert our_features["striped"]["spatial"].dtype == np.float64
    images = image_folders[1]["striped"][:4]
    features = {name: values[:4] for name, values in our_features["striped"].items()}

    # Independently: clean-fid's resize, then torchvision's own forward with hooks on the layers.
    resize = make_resizer("PIL", False, "bicubic", (299, 299))
    resized = torch.stack([torch.from_numpy(resize(image).transpose(2, 0, 1)) for image in images])
    captured = {}
    network = extractor.network
    hooks = [
        network.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, output: captured.update(branch=output)),
        network.avgpool.register_forward_hook(lambda m, i, output: captured.update(pool=output)),
    ]
    try:
        with torch.inference_mode():
            network((resized - 128) / 128)
    finally:
        for hook in hooks:
            hook.remove()
    branch = captured["branch"].numpy()  # (4, 192, 17, 17)
    # TF/ADM flatten order (NHWC, channel fastest): index (h * 17 + w) * 7 + c.
    expected_spatial = branch[:, :7].transpose(0, 2, 3, 1).reshape(4, -1)
    np.testing.assert_allclose(features["spatial"], expected_spatial, rtol=1e-5, atol=1e-6)
    assert features["spatial"][:, (5 * 17 + 11) * 7 + 3] == pytest.approx(branch[:, 3, 5, 11], rel=1e-5)
    np.testing.assert_allclose(
        features["pool"], captured["pool"].reshape(4, -1).numpy(), rtol=1e-5, atol=1e-6
    )
    assert features["spatial"].std(axis=0).max() > 0  # not a constant map

    # Channels-first tensors and lists of single images are read the same way as (B, H, W, 3) arrays.
    channels_first = extractor([torch.from_numpy(images[0]).permute(2, 0, 1)])
    np.testing.assert_allclose(channels_first["pool"], features["pool"][:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        extractor(images.astype(np.float32))


def test_substitute_is_labelled_and_deterministic(substitute):
    extractor, caught, records = substitute
    assert extractor.is_substitute and extractor.weights_path is None
    assert extractor.name.startswith("SUBSTITUTE") and "not comparable" in extractor.name
    assert any(issubclass(w.category, UserWarning) and "NOT comparable" in str(w.message) for w in caught)
    assert any(r.levelno == logging.WARNING and inception.WEIGHTS_ENV_VAR in r.getMessage() for r in records)

    # Seeded inside, and without touching the caller's RNG stream.
    torch.manual_seed(123)
    first = inception._substitute_network().state_dict()
    state_after = torch.get_rng_state()
    torch.manual_seed(456)
    second = inception._substitute_network().state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), state_after)


def test_missing_or_corrupt_weights_raise(tmp_path, monkeypatch):
    missing = tmp_path / "absent" / inception.WEIGHTS_FILE_NAME
    monkeypatch.setenv(inception.WEIGHTS_ENV_VAR, str(missing))
    with pytest.raises(ValueError, match=f"{missing}.*{inception.WEIGHTS_ENV_VAR}"):
        inception.load_inception()
    with pytest.raises(ValueError, match=str(missing)):
        inception.load_inception(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a TorchScript archive")
    with pytest.raises(ValueError, match=f"{corrupt}.*cannot be loaded as TorchScript"):
        inception.load_inception(corrupt)


class TFNamedMixed6(nn.Module):
    """torchvision's Mixed_6d under TF names, as in NVIDIA's TorchScript: `conv` is the 1×1 branch."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv = block.branch1x1
        self.tower = nn.Sequential(block.branch7x7_1, block.branch7x7_2, block.branch7x7_3)
        self.tower_1 = nn.Sequential(*(getattr(block, f"branch7x7dbl_{index}") for index in range(1, 6)))
        self.tower_2 = block.branch_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(pooled)], 1)


class NvidiaLikeInception(nn.Module):
    """The outer module: `layers` is what clean-fid calls, on (x - 128) / 128."""

    def __init__(self, layers: nn.Module) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers((images - 128) / 128).reshape(-1, 2048)


# NVIDIA's `layers` stage names (from the scripted code) → the substitute network's corresponding modules.
TF_STAGE_NAMES = {
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "pool0": "maxpool1",
    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3", "pool1": "maxpool2", "mixed": "Mixed_5b",
    "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b",
    "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a",
    "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c", "pool2": "avgpool",
}  # fmt: skip


def save_torchscript(module: nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        torch.jit.script(module).save(str(path))


def test_torchscript_with_nvidia_layout_is_loaded_and_split(
    substitute, image_folders, our_features, tmp_path
):
    extractor = substitute[0]
    network = extractor.network
    stages = collections.OrderedDict(
        (tf_name, TFNamedMixed6(network.Mixed_6d) if tf_name == "mixed_6" else getattr(network, name))
        for tf_name, name in TF_STAGE_NAMES.items()
    )
    path = tmp_path / inception.WEIGHTS_FILE_NAME
    save_torchscript(NvidiaLikeInception(nn.Sequential(stages)), path)

    loaded = inception.load_inception(path, batch_size=4)
    assert not loaded.is_substitute and loaded.weights_path == path and str(path) in loaded.name
    actual = loaded(image_folders[1]["smooth"][:4])
    np.testing.assert_allclose(actual["pool"], our_features["smooth"]["pool"][:4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(actual["spatial"], our_features["smooth"]["spatial"][:4], rtol=1e-5, atol=1e-6)


def test_verification_refuses_a_wrong_branch_or_stage_list(substitute):
    network = substitute[0].network
    reference_pool = inception._torchvision_reference_pool(network)
    before = [getattr(network, name) for name in inception.TORCHVISION_STAGES_BEFORE_MIXED_6]
    after = [getattr(network, name) for name in inception.TORCHVISION_STAGES_FROM_MIXED_6]
    wrong_branch = inception.InceptionTrunk(before, network.Mixed_6d.branch_pool, after)  # the pool branch
    with pytest.raises(ValueError, match="does not begin with its 1×1 branch"):
        inception._verify_trunk(wrong_branch, reference_pool, "test", torch.device("cpu"))
    skipped_stage = [module for module in before if module is not network.Mixed_6b]  # 768 → 768: shapes fit
    missing_stage = inception.InceptionTrunk(skipped_stage, network.Mixed_6d.branch1x1, after)
    with pytest.raises(ValueError, match="does not reproduce its own pool_3"):
        inception._verify_trunk(missing_stage, reference_pool, "test", torch.device("cpu"))


def test_torchscript_without_mixed_6_conv_is_refused(tmp_path):
    small = nn.Sequential(
        collections.OrderedDict(
            [("conv", nn.Conv2d(3, 4, 3)), ("mixed_5", nn.ReLU()), ("mixed_6", nn.ReLU())]
        )
    )
    path = tmp_path / "small.pt"
    save_torchscript(NvidiaLikeInception(small), path)
    with pytest.raises(ValueError, match=r"layers\.mixed_6\.conv"):
        inception.load_inception(path)


def test_patch_boxes_grid_random_and_errors():
    boxes = patch_boxes(600, 1000, size=256, mode="grid")
    assert len(boxes) == 2 * 3  # 600 // 256 rows, 1000 // 256 columns
    for index, (top, left) in enumerate(boxes):
        assert 0 <= top <= 600 - 256 and 0 <= left <= 1000 - 256
        for other_top, other_left in boxes[index + 1 :]:
            assert abs(top - other_top) >= 256 or abs(left - other_left) >= 256  # no overlap
    assert {top for top, _ in boxes} == {0, 600 - 256} and {left for _, left in boxes} == {0, 372, 1000 - 256}
    assert patch_boxes(300, 300, size=256) == [(22, 22)]  # a single tile is centred
    limited = patch_boxes(1024, 1024, size=256, count=5)
    assert len(limited) == 5 and set(limited) <= set(patch_boxes(1024, 1024, size=256))

    first = patch_boxes(500, 700, size=128, count=6, mode="random", seed=3, image_index=2)
    assert first == patch_boxes(500, 700, size=128, count=6, mode="random", seed=3, image_index=2)
    assert first != patch_boxes(500, 700, size=128, count=6, mode="random", seed=3, image_index=3)
    assert first != patch_boxes(500, 700, size=128, count=6, mode="random", seed=4, image_index=2)
    assert all(0 <= top <= 500 - 128 and 0 <= left <= 700 - 128 for top, left in first)

    with pytest.raises(ValueError, match=r"200×300.*256×256"):
        patch_boxes(200, 300, size=256)
    with pytest.raises(ValueError, match="count"):
        patch_boxes(500, 500, size=256, mode="random")

    image = np.arange(3 * 40 * 50, dtype=np.uint8).reshape(3, 40, 50)
    patches = extract_patches(image, [(0, 0), (8, 34)], 16)
    assert patches.shape == (2, 3, 16, 16)
    np.testing.assert_array_equal(patches[1], image[:, 8:24, 34:50])
    assert torch.equal(
        extract_patches(torch.from_numpy(image), [(8, 34)], 16)[0], torch.from_numpy(patches[1])
    )
    with pytest.raises(ValueError, match="leaves"):
        extract_patches(image, [(30, 0)], 16)
