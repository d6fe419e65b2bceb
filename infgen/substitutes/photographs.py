"""Real photographs that installed packages ship, split once into a training set (the substitute VAE may learn
from these) and a held-out set (never used to train anything; the VAE's PSNR check and the demo's
real-photograph evaluation row use only these).

scikit-image ships the held-out ones (the `pipeline` extra installs it: the demo evaluates on them). The
training set adds scikit-learn's and matplotlib's sample photographs (`vae-training` extra): only the
reproduction script of the substitute VAE reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from infgen._extras import import_extra


@dataclass(frozen=True)
class Photograph:
    name: str
    package: str  # which installed package ships it
    file: str  # the file inside that package's sample-data folder


# Natural colour scenes: a person, a cat, a cup, a rocket on its pad. Kept out of every training run.
HELD_OUT = (
    Photograph("astronaut", "scikit-image", "astronaut.png"),
    Photograph("chelsea", "scikit-image", "chelsea.png"),
    Photograph("coffee", "scikit-image", "coffee.png"),
    Photograph("rocket", "scikit-image", "rocket.jpg"),
)
# Colour photographs and grey texture photographs (loaded as grey RGB) the substitute VAE trains on.
TRAINING = (
    Photograph("hubble_deep_field", "scikit-image", "hubble_deep_field.jpg"),
    Photograph("immunohistochemistry", "scikit-image", "ihc.png"),
    Photograph("retina", "scikit-image", "retina.jpg"),
    Photograph("motorcycle_left", "scikit-image", "motorcycle_left.png"),
    Photograph("motorcycle_right", "scikit-image", "motorcycle_right.png"),
    Photograph("brick", "scikit-image", "brick.png"),
    Photograph("grass", "scikit-image", "grass.png"),
    Photograph("gravel", "scikit-image", "gravel.png"),
    Photograph("camera", "scikit-image", "camera.png"),
    Photograph("moon", "scikit-image", "moon.png"),
    Photograph("coins", "scikit-image", "coins.png"),
    Photograph("china", "scikit-learn", "china.jpg"),
    Photograph("flower", "scikit-learn", "flower.jpg"),
    Photograph("grace_hopper", "matplotlib", "grace_hopper.jpg"),
)


def _sample_data_folder(package: str) -> str:
    if package == "scikit-image":
        skimage = import_extra("skimage", "scikit-image", "The scikit-image sample photographs")
        return os.path.join(os.path.dirname(skimage.__file__), "data")
    if package == "scikit-learn":
        sklearn = import_extra("sklearn", "scikit-learn", "The scikit-learn sample photographs")
        return os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    if package == "matplotlib":
        matplotlib = import_extra("matplotlib", "matplotlib", "The matplotlib sample photographs")
        return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data")
    raise ValueError(f"no sample photographs known for package {package!r}")


def photograph_path(photograph: Photograph) -> str:
    path = os.path.join(_sample_data_folder(photograph.package), photograph.file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{photograph.package} has no sample photograph {photograph.file} at {path}")
    return path


def load_photograph(photograph: Photograph) -> np.ndarray:
    """(H, W, 3) uint8 RGB; grey photographs are repeated over the three channels, alpha is dropped."""
    from PIL import Image

    with Image.open(photograph_path(photograph)) as image:
        return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays
