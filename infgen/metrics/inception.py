"""Inception-v3 features for FID, sFID, KID and precision/recall: clean-fid's "clean" features, plus sFID's.

clean-fid 0.1.35 supplies the network and its preprocessing, and this module reuses its code for them:
`cleanfid.inception_torchscript.InceptionV3W` loads NVIDIA's TorchScript translation of TensorFlow's
inception-2015-12-05 graph and its forward normalises ((x - 128) / 128), runs the TorchScript's `layers` and
views the result as the (B, 2048) pool_3 features; `cleanfid.resize.build_resizer("clean")` resizes each
(H, W, 3) uint8 image to 299×299 per channel as float32 PIL images (bicubic, antialiased, clipped to
[0, 255], not rounded back to 8 bits). The tests check that our FID equals clean-fid's
`compute_fid(mode="clean", custom_feat_extractor=...)` on the same images.

What clean-fid lacks, and this module adds:

- The weights only ever come from a local path: the `weights` argument, else $INFGEN_INCEPTION_WEIGHTS, else
  clean-fid's own location. clean-fid downloads the file to a hard-coded /tmp at first use, which fails on
  offline cluster nodes (docs/dependencies.md, "clean-fid and LPIPS"); this module never downloads.
- Without weights, a SUBSTITUTE network, loudly: a seeded random-init torchvision Inception-v3, whose numbers
  only compare with other numbers from the same substitute (`is_substitute` and `name` say so, for the run
  record). It runs through the same InceptionV3W forward.
- sFID's spatial features, after OpenAI's ADM evaluator (guided-diffusion evaluations/evaluator.py): the TF
  tensor "mixed_6/conv:0", the ReLU output of the 1×1 branch of the third Inception-C 17×17 block
  (torchvision's Mixed_6d.branch1x1, 192 channels), first 7 channels, flattened per image in TF's NHWC order
  (channel fastest: index (h * 17 + w) * 7 + c), as ADM's `spatial[..., :7].reshape(B, -1)`. ADM resizes
  with TF's bilinear resize, we with clean-fid's bicubic one: our sFID uses ADM's features but is not
  numerically ADM's sFID.
- The tap's verification. The TorchScript's `layers` is a straight chain of TF-named stages (conv, conv_1,
  conv_2, pool0, conv_3, conv_4, pool1, mixed, mixed_1, ..., mixed_10, pool2), and each mixed block
  concatenates its branches with the 1×1 `conv` branch first (as read from the scripted code, e.g. the code
  dump in a public PaddlePaddle port of this file; we could not open the file itself). So InceptionTrunk runs
  those stages in order in place of `layers`, applying `layers.mixed_6.conv` to mixed_5's output on the side.
  Because that rests on reading, not on the file, every load VERIFIES it on a probe image: the chained stages
  must reproduce clean-fid's own features, and mixed_6's output must begin with `mixed_6.conv`'s output;
  otherwise loading fails.

clean-fid is in the `pipeline` extra: without it, importing this module raises ImportError saying so.
"""

from __future__ import annotations

import logging
import math
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from infgen._extras import import_extra
from infgen.metrics.local_weights import find_local_weights

_CLEAN_FID_FEATURE = "infgen.metrics.inception (FID, sFID, KID, precision/recall features)"
InceptionV3W = import_extra("cleanfid.inception_torchscript", "clean-fid", _CLEAN_FID_FEATURE).InceptionV3W
build_resizer = import_extra("cleanfid.resize", "clean-fid", _CLEAN_FID_FEATURE).build_resizer
WEIGHTS_URL = import_extra("cleanfid.downloads_helper", "clean-fid", _CLEAN_FID_FEATURE).inception_url

logger = logging.getLogger(__name__)

WEIGHTS_ENV_VAR = "INFGEN_INCEPTION_WEIGHTS"
WEIGHTS_FILE_NAME = "inception-2015-12-05.pt"  # the name InceptionV3W loads from the directory it is given

INPUT_SIZE = 299
POOL_DIMENSION = 2048
SPATIAL_CHANNELS = 7  # ADM's evaluator keeps the first 7 of mixed_6/conv's 192 channels
SPATIAL_SIDE = 17
SPATIAL_DIMENSION = SPATIAL_CHANNELS * SPATIAL_SIDE * SPATIAL_SIDE  # 2023
SUBSTITUTE_SEED = 0
SUBSTITUTE_NAME = (
    f"SUBSTITUTE random-init Inception-v3 seed {SUBSTITUTE_SEED} — not comparable to published FID"
)
TORCHVISION_INIT_STD = 0.1  # torchvision's Inception3 init: truncated normal, std 0.1 for every conv

# torchvision Inception3 children that correspond to the TorchScript's `layers` chain, split where mixed_6
# (= Mixed_6d) begins. AuxLogits, dropout and fc are not on the pool_3 path.
TORCHVISION_STAGES_BEFORE_MIXED_6 = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
)  # fmt: skip
TORCHVISION_STAGES_FROM_MIXED_6 = ("Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")


def default_weights_path() -> Path:
    """Where clean-fid itself looks for (and would download) the weights: /tmp, or ./ on Windows."""
    directory = "./" if platform.system() == "Windows" else "/tmp"  # cleanfid.features.feature_extractor
    return Path(directory) / WEIGHTS_FILE_NAME


class InceptionTrunk(nn.Module):
    """The network's `layers` taken apart at mixed_6, so that sFID's mixed_6/conv can be read on the way.

    It runs as the `layers` of a clean-fid InceptionV3W: normalised images (B, 3, 299, 299) → the pool_3 map
    (B, 2048, 1, 1), which InceptionV3W.forward views as (B, 2048). `stages_before_mixed_6` then
    `stages_from_mixed_6` are the pool_3 path in order; `spatial_branch` is mixed_6's 1×1 branch, applied to
    mixed_6's input on the side. The spatial features (B, 2023) of the latest call are left in `spatial`,
    for the caller to take right after it (InceptionFeatures.features does, one batch at a time).
    """

    def __init__(
        self,
        stages_before_mixed_6: Sequence[nn.Module],
        spatial_branch: nn.Module,
        stages_from_mixed_6: Sequence[nn.Module],
    ) -> None:
        super().__init__()
        self.stages_before_mixed_6 = nn.ModuleList(stages_before_mixed_6)
        self.spatial_branch = spatial_branch
        self.stages_from_mixed_6 = nn.ModuleList(stages_from_mixed_6)
        self.spatial: torch.Tensor | None = None

    def forward(self, normalised: torch.Tensor) -> torch.Tensor:
        hidden = normalised
        for stage in self.stages_before_mixed_6:
            hidden = stage(hidden)
        branch = self.spatial_branch(hidden)  # (B, 192, 17, 17), NCHW
        # TF's NHWC flatten order, as ADM's evaluator: channel fastest.
        self.spatial = branch[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(normalised.shape[0], -1)
        for stage in self.stages_from_mixed_6:
            hidden = stage(hidden)
        return hidden


def _clean_fid_network(layers: nn.Module) -> nn.Module:
    """clean-fid's InceptionV3W in "clean" mode running `layers`, built without reading a file.

    Its forward is clean-fid's whole feature computation: (x - 128) / 128, `layers`, view as (B, 2048).
    InceptionV3W.__init__ only loads the TorchScript file (downloading it when absent) and takes its `layers`,
    so it is skipped here.
    """
    network = InceptionV3W.__new__(InceptionV3W)
    nn.Module.__init__(network)
    network.layers = layers
    # Clean mode: images arrive resized to 299² (build_resizer("clean")); only resize_inside=True would use
    # InceptionV3W's `base`, the whole TorchScript, which is therefore not needed here.
    network.resize_inside = False
    return network


class InceptionFeatures:
    """Callable extractor: uint8 images of any size → {"pool": (B, 2048), "spatial": (B, 2023)} in float64.

    Attributes: `name` (what to record next to the numbers), `is_substitute`, `weights_path` (None for the
    substitute), `network` (the underlying TorchScript or torchvision module), `trunk`, `device`,
    `batch_size`.
    """

    def __init__(
        self,
        trunk: InceptionTrunk,
        network: nn.Module,
        name: str,
        is_substitute: bool,
        weights_path: Path | None,
        device: torch.device,
        batch_size: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.trunk = trunk
        self.network = network
        self.name = name
        self.is_substitute = is_substitute
        self.weights_path = weights_path
        self.device = device
        self.batch_size = batch_size
        self._clean_fid_network = _clean_fid_network(trunk)
        self._resize = build_resizer("clean")

    def __repr__(self) -> str:
        return f"InceptionFeatures(name={self.name!r}, device={self.device})"

    def __call__(self, images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]) -> dict:
        return self.features(images)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """One (H, W, 3) uint8 image → (299, 299, 3) float32 in [0, 255], clean-fid's "clean" resize."""
        return self._resize(np.ascontiguousarray(image))

    def features(self, images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]) -> dict:
        """Pool_3 and spatial features of uint8 images: (B, 3, H, W), (B, H, W, 3) or a list of single images.

        Returns {"pool": (B, 2048), "spatial": (B, 2023)} as float64 numpy arrays (computed in float32).
        """
        image_list = _as_hwc_uint8_list(images)
        pools, spatials = [], []
        for start in range(0, len(image_list), self.batch_size):
            chunk = image_list[start : start + self.batch_size]
            # clean-fid's ToTensor of a float32 (H, W, 3) array: a transpose to (3, H, W), no rescaling.
            resized = torch.stack(
                [torch.from_numpy(self.resize(image).transpose(2, 0, 1)) for image in chunk]
            )
            with torch.inference_mode():
                pool = self._clean_fid_network(resized.float().contiguous().to(self.device))
                spatial = self.trunk.spatial  # computed by that same call
            pools.append(pool.cpu().numpy())
            spatials.append(spatial.cpu().numpy())
        return {
            "pool": np.concatenate(pools).astype(np.float64),
            "spatial": np.concatenate(spatials).astype(np.float64),
        }

    def clean_fid_module(self) -> nn.Module:
        """The module for `cleanfid.fid.compute_fid(custom_feat_extractor=...)`: clean-fid's InceptionV3W
        (its forward, pool_3 only) on this extractor's network."""
        return self._clean_fid_network


def load_inception(
    weights: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 50
) -> InceptionFeatures:
    """The Inception feature extractor: NVIDIA's TorchScript when found locally, else a labelled substitute.

    weights: path to inception-2015-12-05.pt. When None, try $INFGEN_INCEPTION_WEIGHTS, then
    default_weights_path() (clean-fid's /tmp location); with neither present, warn and use the substitute.
    A path that is given (argument or env var) but missing, unreadable or not that network raises ValueError.
    Never downloads anything.
    """
    device = torch.device(device)
    path = _find_weights(weights)
    if path is None:
        _warn_substitute()
        network = _substitute_network()
        trunk = _trunk_from_torchvision(network)
        reference_pool = _torchvision_reference_pool(network)
        name, source = SUBSTITUTE_NAME, "the substitute Inception-v3"
    else:
        network, trunk, reference_pool = _trunk_from_torchscript(path)
        name, source = f"clean-fid inception-2015-12-05 ({path})", str(path)
    # The whole network, not only the trunk: the verification runs the network's own forward on `device`.
    network.to(device).eval()
    for parameter in network.parameters():  # ScriptModules refuse requires_grad_(); parameters are fine
        parameter.requires_grad_(False)
    _verify_trunk(trunk, reference_pool, source, device)
    return InceptionFeatures(trunk, network, name, path is None, path, device, batch_size)


def _find_weights(weights: str | Path | None) -> Path | None:
    return find_local_weights(
        weights, WEIGHTS_ENV_VAR, default_weights_path(), "Inception weights", ValueError
    )


def _warn_substitute() -> None:
    message = (
        f"FID/sFID/KID/precision/recall use a {SUBSTITUTE_NAME}: no Inception weights were found (looked "
        f"for ${WEIGHTS_ENV_VAR} and {default_weights_path()}). These values are NOT comparable to published "
        f"ones, only to others from the same substitute. Put NVIDIA's {WEIGHTS_FILE_NAME} "
        f"(from {WEIGHTS_URL}) at {default_weights_path()}, set ${WEIGHTS_ENV_VAR}, or pass its path."
    )
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def _substitute_network() -> nn.Module:
    """torchvision's Inception-v3 with its own random init under a fixed seed, identical in every process.

    torchvision draws every conv from N(0, 0.1²); with eval-mode batch norm at its initial identity
    statistics, activations then grow by ~1.5-2× per layer and pool_3 features reach ~1e10, where FID is ~1e20
    and float32 features keep no useful digits. Each conv's draw is therefore rescaled to He variance
    (2 / fan_in), which keeps features O(1).
    """
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(SUBSTITUTE_SEED)
        network = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.mul_(math.sqrt(2.0 / fan_in) / TORCHVISION_INIT_STD)
    return network.eval()


def _trunk_from_torchvision(network: nn.Module) -> InceptionTrunk:
    return InceptionTrunk(
        [getattr(network, name) for name in TORCHVISION_STAGES_BEFORE_MIXED_6],
        network.Mixed_6d.branch1x1,
        [getattr(network, name) for name in TORCHVISION_STAGES_FROM_MIXED_6],
    )


def _torchvision_reference_pool(network: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pool_3 through torchvision's own forward (caught at avgpool), independent of our stage list."""

    def reference_pool(images: torch.Tensor) -> torch.Tensor:
        captured = []
        handle = network.avgpool.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            network((images - 128) / 128)
        finally:
            handle.remove()
        return captured[0].reshape(images.shape[0], POOL_DIMENSION)

    return reference_pool


def _load_with_clean_fid(path: Path) -> nn.Module:
    """InceptionV3W(directory, download=False): clean-fid's own loader, which reads `WEIGHTS_FILE_NAME` in
    the directory it is given; a file under another name is linked under that name in a temporary one."""
    with warnings.catch_warnings():
        # torch 2.14 deprecates TorchScript; this file only exists as TorchScript, so the warning is noise.
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning
        )
        if path.name == WEIGHTS_FILE_NAME:
            return InceptionV3W(str(path.parent), download=False, resize_inside=False)
        directory = Path(tempfile.mkdtemp(prefix="infgen-inception-"))
        try:
            (directory / WEIGHTS_FILE_NAME).symlink_to(path.resolve())
            return InceptionV3W(str(directory), download=False, resize_inside=False)
        finally:
            shutil.rmtree(directory)  # torch.jit.load has read the whole file


def _trunk_from_torchscript(path: Path) -> tuple[nn.Module, InceptionTrunk, Callable]:
    """Load the TorchScript with clean-fid's InceptionV3W and split its `layers` at mixed_6."""
    expected = f"expected NVIDIA's TorchScript {WEIGHTS_FILE_NAME} from {WEIGHTS_URL}"
    try:
        clean_fid = _load_with_clean_fid(path)
    except Exception as error:  # torch raises RuntimeError for most bad files, but other types for some
        raise ValueError(
            f"Inception weights {path} cannot be loaded as TorchScript with a `layers` submodule by "
            f"clean-fid's InceptionV3W ({type(error).__name__}: {error}); {expected}"
        ) from error
    base, layers = clean_fid.base, clean_fid.layers
    stages = list(layers.named_children())
    names = [name for name, _ in stages]
    if (
        "mixed_5" not in names
        or "mixed_6" not in names
        or names.index("mixed_6") != names.index("mixed_5") + 1
    ):
        raise ValueError(
            f"Inception weights {path}: `layers` children {names} do not contain mixed_5 directly followed "
            f"by mixed_6, which sFID's mixed_6/conv features need; {expected}"
        )
    split = names.index("mixed_6")
    spatial_branch = getattr(stages[split][1], "conv", None)
    if not isinstance(spatial_branch, nn.Module):
        raise ValueError(
            f"Inception weights {path} have no `layers.mixed_6.conv` (TF mixed_6/conv); {expected}"
        )
    trunk = InceptionTrunk(
        [module for _, module in stages[:split]], spatial_branch, [module for _, module in stages[split:]]
    )
    return base, trunk, clean_fid.forward  # clean-fid's features with the untouched `layers`, the reference


def _verify_trunk(trunk: InceptionTrunk, reference_pool: Callable, source: str, device: torch.device) -> None:
    """Check on a probe image that the trunk computes what the network computes; raise ValueError if not.

    Two facts are checked: the stages chained in clean-fid's InceptionV3W forward reproduce the network's own
    pool_3 (so the stage list is the whole path, in order), and mixed_6's output starts with the spatial
    branch's output (so that branch is the 1×1 branch, applied to mixed_6's input, after its ReLU).
    """
    generator = torch.Generator().manual_seed(0)
    probe = (torch.rand(1, 3, INPUT_SIZE, INPUT_SIZE, generator=generator) * 255).to(device)
    try:
        with torch.inference_mode():
            expected_pool = reference_pool(probe)
            pool = _clean_fid_network(trunk)(probe)
            # The stages before mixed_6 once more (after InceptionV3W.forward's normalisation), to compare
            # mixed_6's whole output with the branch's.
            hidden = (probe - 128) / 128
            for stage in trunk.stages_before_mixed_6:
                hidden = stage(hidden)
            branch = trunk.spatial_branch(hidden)
            block = trunk.stages_from_mixed_6[0](hidden)
    except Exception as error:  # a scripted submodule without a usable forward, wrong shapes, ...
        raise ValueError(f"Inception network from {source} cannot be run stage by stage: {error}") from error
    if tuple(branch.shape[2:]) != (SPATIAL_SIDE, SPATIAL_SIDE) or branch.shape[1] < SPATIAL_CHANNELS:
        raise ValueError(
            f"Inception network from {source}: mixed_6's 1×1 branch gives shape {tuple(branch.shape)}, "
            f"expected (1, ≥{SPATIAL_CHANNELS}, {SPATIAL_SIDE}, {SPATIAL_SIDE}) in NCHW"
        )
    if not _close(block[:, : branch.shape[1]], branch):
        raise ValueError(
            f"Inception network from {source}: mixed_6's output does not begin with its 1×1 branch's output, "
            "so that branch is not TF's mixed_6/conv as sFID needs"
        )
    if tuple(pool.shape) != (1, POOL_DIMENSION) or not _close(pool, expected_pool):
        raise ValueError(
            f"Inception network from {source}: running its stages in order does not reproduce its own pool_3 "
            "features, so its structure is not the straight chain this extractor assumes"
        )


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float32 noise; a wrong stage order or branch gives differences of order one."""
    if actual.shape != expected.shape:
        return False
    scale = expected.abs().max().clamp_min(1e-12)
    return bool(torch.allclose(actual, expected, rtol=1e-3, atol=1e-4 * float(scale)))


def _as_hwc_uint8_list(images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]) -> list:
    """Split a uint8 batch (B, 3, H, W) / (B, H, W, 3), or a list of single images, into (H, W, 3) arrays."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        array = _to_numpy(images)
        if array.ndim != 4:
            raise ValueError(f"expected a batch shaped (B, 3, H, W) or (B, H, W, 3), got {array.shape}")
        layout = _channel_layout(array.shape[1:])
        batch = array if layout == "hwc" else array.transpose(0, 2, 3, 1)
        image_list = list(batch)
    else:
        image_list = []
        for image in images:
            array = _to_numpy(image)
            if array.ndim != 3:
                raise ValueError(f"expected single images shaped (3, H, W) or (H, W, 3), got {array.shape}")
            image_list.append(array if _channel_layout(array.shape) == "hwc" else array.transpose(1, 2, 0))
    if not image_list:
        raise ValueError("no images given")
    for image in image_list:
        if image.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 images (FID is defined on 8-bit images as saved), got {image.dtype}; "
                "quantise first, e.g. with infgen.images.to_uint8"
            )
    return image_list


def _to_numpy(images: torch.Tensor | np.ndarray) -> np.ndarray:
    return images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)


def _channel_layout(shape: tuple[int, ...]) -> str:
    """'chw' or 'hwc' for one image's shape (3, H, W) or (H, W, 3)."""
    channels_first, channels_last = shape[0] == 3, shape[-1] == 3
    if channels_first and channels_last:
        raise ValueError(f"image shape {shape} is ambiguous: both (3, H, W) and (H, W, 3) fit")
    if not (channels_first or channels_last):
        raise ValueError(f"expected RGB images shaped (3, H, W) or (H, W, 3), got {shape}")
    return "chw" if channels_first else "hwc"
