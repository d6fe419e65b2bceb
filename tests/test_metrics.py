"""PSNR and SSIM (infgen.metrics) against scikit-image on real photographs that scikit-image ships (offline).

Each photograph is cropped to 144x176 (non-square, so a swapped height/width shows up; multiples of 8 for the
block-DCT distortion) and distorted four ways, so PSNR and SSIM take ordinary, non-trivial values.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy import fft, ndimage
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from infgen.metrics import psnr, ssim

TOLERANCE = 1e-4

# (rows, columns) of a 144x176 crop with some structure in each photograph.
CROPS = {
    "astronaut": (slice(40, 184), slice(150, 326)),
    "coffee": (slice(100, 244), slice(200, 376)),
    "chelsea": (slice(60, 204), slice(120, 296)),
    "camera": (slice(60, 204), slice(180, 356)),  # greyscale: one channel
    "hubble_deep_field": (slice(300, 444), slice(400, 576)),
}
# scikit-image's settings for our gaussian=True mode (Wang et al. 2004).
SKIMAGE_GAUSSIAN = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """These images are tiny; on a busy CI machine torch's thread pool costs far more than it saves."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def photograph(name: str) -> np.ndarray:
    """A crop of a scikit-image sample photograph as float64 (C, H, W) in [0, 1]."""
    rows, columns = CROPS[name]
    image = getattr(data, name)()[rows, columns].astype(np.float64) / 255.0
    image = image[..., None] if image.ndim == 2 else image
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def add_noise(image: np.ndarray) -> np.ndarray:
    generator = np.random.default_rng(1234)
    return np.clip(image + generator.normal(0.0, 0.08, image.shape), 0.0, 1.0)


def blur(image: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(image, sigma=(0.0, 1.2, 1.2))


def quantise_like_jpeg(image: np.ndarray) -> np.ndarray:
    """Round 8x8 block DCT coefficients, with coarser steps at higher frequencies as JPEG tables do."""
    channels, height, width = image.shape
    blocks = image.reshape(channels, height // 8, 8, width // 8, 8)
    coefficients = fft.dctn(blocks, axes=(2, 4), norm="ortho")
    step = (0.03 * (1 + np.add.outer(np.arange(8), np.arange(8))))[:, None, :]  # broadcasts over axes 2, 4
    coefficients = np.round(coefficients / step) * step
    restored = fft.idctn(coefficients, axes=(2, 4), norm="ortho").reshape(channels, height, width)
    return np.clip(restored, 0.0, 1.0)


def shift(image: np.ndarray) -> np.ndarray:
    return np.roll(image, shift=(2, -3), axis=(1, 2))


DISTORTIONS = {"noise": add_noise, "blur": blur, "jpeg": quantise_like_jpeg, "shift": shift}
# (map from [0, 1] to the tested range, data_range of that range)
RANGES = {"unit": (lambda image: image, 1.0), "signed": (lambda image: 2.0 * image - 1.0, 2.0)}


def pair(name: str, distortion: str, value_range: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(reference, distorted, data_range) in the requested value range."""
    to_range, data_range = RANGES[value_range]
    reference = photograph(name)
    return to_range(reference), to_range(DISTORTIONS[distortion](reference)), data_range


@pytest.mark.parametrize("value_range", RANGES)
@pytest.mark.parametrize("distortion", DISTORTIONS)
@pytest.mark.parametrize("name", CROPS)
def test_psnr_matches_skimage(name: str, distortion: str, value_range: str) -> None:
    reference, distorted, data_range = pair(name, distortion, value_range)
    expected = peak_signal_noise_ratio(reference, distorted, data_range=data_range)
    assert 10.0 < expected < 50.0  # the distortion really changed the image
    actual = psnr(torch.from_numpy(distorted)[None], torch.from_numpy(reference)[None], data_range=data_range)
    assert actual.shape == (1,) and actual.dtype == torch.float64
    assert actual.item() == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("gaussian", [False, True], ids=["uniform", "gaussian"])
@pytest.mark.parametrize("value_range", RANGES)
@pytest.mark.parametrize("distortion", DISTORTIONS)
@pytest.mark.parametrize("name", CROPS)
def test_ssim_matches_skimage(name: str, distortion: str, value_range: str, gaussian: bool) -> None:
    reference, distorted, data_range = pair(name, distortion, value_range)
    options = SKIMAGE_GAUSSIAN if gaussian else {}
    expected = structural_similarity(reference, distorted, data_range=data_range, channel_axis=0, **options)
    assert 0.05 < expected < 0.99  # the distortion really changed the image
    actual = ssim(
        torch.from_numpy(distorted)[None],
        torch.from_numpy(reference)[None],
        data_range=data_range,
        gaussian=gaussian,
    )
    assert actual.shape == (1,) and actual.dtype == torch.float64
    assert actual.item() == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ({"window_size": 5}, {"win_size": 5}),
        ({"window_size": 11}, {"win_size": 11}),
        ({"gaussian": True, "sigma": 1.0}, {**SKIMAGE_GAUSSIAN, "sigma": 1.0}),  # 9-tap window
        ({"gaussian": True, "sigma": 2.0}, {**SKIMAGE_GAUSSIAN, "sigma": 2.0}),  # 15-tap window
    ],
)
def test_ssim_window_options_match_skimage(ours: dict, theirs: dict) -> None:
    reference, distorted, data_range = pair("chelsea", "blur", "signed")
    expected = structural_similarity(reference, distorted, data_range=data_range, channel_axis=0, **theirs)
    actual = ssim(torch.from_numpy(distorted), torch.from_numpy(reference), data_range=data_range, **ours)
    assert actual.item() == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("gaussian", [False, True], ids=["uniform", "gaussian"])
def test_batch_gives_one_value_per_image(gaussian: bool) -> None:
    first_reference, first_distorted, _ = pair("astronaut", "noise", "signed")
    second_reference, second_distorted, _ = pair("coffee", "jpeg", "signed")
    references = torch.from_numpy(np.stack([first_reference, second_reference]))
    distorted = torch.from_numpy(np.stack([first_distorted, second_distorted]))
    options = SKIMAGE_GAUSSIAN if gaussian else {}

    psnr_values = psnr(distorted, references)  # default data_range=2 suits [-1, 1]
    ssim_values = ssim(distorted, references, gaussian=gaussian)
    assert psnr_values.shape == ssim_values.shape == (2,)
    pairs = [(first_reference, first_distorted), (second_reference, second_distorted)]
    for index, (reference, image) in enumerate(pairs):
        expected_psnr = peak_signal_noise_ratio(reference, image, data_range=2.0)
        expected_ssim = structural_similarity(reference, image, data_range=2.0, channel_axis=0, **options)
        assert psnr_values[index].item() == pytest.approx(expected_psnr, abs=TOLERANCE)
        assert ssim_values[index].item() == pytest.approx(expected_ssim, abs=TOLERANCE)
    # The two images are scored differently, so a value averaged over the batch could not pass the loop above.
    assert abs(psnr_values[0] - psnr_values[1]) > 0.5
    assert abs(ssim_values[0] - ssim_values[1]) > 0.01


def test_unbatched_input_gives_a_scalar_equal_to_the_batched_value() -> None:
    reference, distorted, _ = pair("camera", "shift", "signed")
    reference, distorted = torch.from_numpy(reference), torch.from_numpy(distorted)
    for metric in (psnr, ssim):
        single = metric(distorted, reference)
        assert single.shape == ()
        assert single.item() == metric(distorted[None], reference[None])[0].item()


def test_float32_input_is_scored_in_float64() -> None:
    reference, distorted, data_range = pair("hubble_deep_field", "blur", "unit")
    expected = structural_similarity(reference, distorted, data_range=data_range, channel_axis=0)
    actual = ssim(
        torch.from_numpy(distorted).float()[None], torch.from_numpy(reference).float()[None], data_range=1.0
    )
    assert actual.dtype == torch.float64
    assert actual.item() == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("name", ["astronaut", "camera"])
def test_identical_images_give_infinite_psnr_and_unit_ssim(name: str) -> None:
    image = torch.from_numpy(photograph(name) * 2.0 - 1.0)[None]
    assert torch.isposinf(psnr(image, image.clone())).all()
    for gaussian in (False, True):
        assert ssim(image, image.clone(), gaussian=gaussian).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("metric", [psnr, ssim])
@pytest.mark.parametrize(
    ("prediction_shape", "target_shape", "message"),
    [
        ((1, 3, 16, 16), (1, 3, 16, 17), "same shape"),
        ((1, 1, 16, 16), (1, 3, 16, 16), "same shape"),
        ((2, 3, 16, 16), (1, 3, 16, 16), "same shape"),
        ((16, 16), (16, 16), r"\(B, C, H, W\) or \(C, H, W\)"),
        ((1, 1, 1, 16, 16), (1, 1, 1, 16, 16), r"\(B, C, H, W\) or \(C, H, W\)"),
    ],
)
def test_bad_shapes_raise(metric, prediction_shape, target_shape, message) -> None:
    with pytest.raises(ValueError, match=message):
        metric(torch.zeros(prediction_shape), torch.zeros(target_shape))


@pytest.mark.parametrize("metric", [psnr, ssim])
@pytest.mark.parametrize("data_range", [0.0, -2.0])
def test_non_positive_data_range_raises(metric, data_range: float) -> None:
    image = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="data_range must be positive"):
        metric(image, image + 0.1, data_range=data_range)


def test_images_smaller_than_the_window_raise() -> None:
    with pytest.raises(ValueError, match="smaller than the 7x7 SSIM window"):
        ssim(torch.zeros(1, 3, 6, 20), torch.zeros(1, 3, 6, 20))
    # 10x10 fits the uniform 7x7 window but not the 11x11 gaussian one derived from sigma=1.5.
    image = torch.from_numpy(photograph("camera")[:, :10, :10])
    assert ssim(image, image.flip(-1), data_range=1.0).item() < 1.0
    with pytest.raises(ValueError, match="smaller than the 11x11 SSIM window"):
        ssim(image, image.flip(-1), data_range=1.0, gaussian=True)


@pytest.mark.parametrize("window_size", [6, 1, 0])
def test_invalid_window_size_raises(window_size: int) -> None:
    image = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match="window_size must be an odd integer"):
        ssim(image, image, window_size=window_size)


def test_non_positive_sigma_raises() -> None:
    image = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match="sigma must be positive"):
        ssim(image, image, gaussian=True, sigma=0.0)
