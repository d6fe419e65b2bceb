"""The frozen KL-f8 VAE around InfGen: its encoder makes the training latents, its decoder is the baseline.

InfGen replaces only the decoder; the encoder stays the latent-diffusion model's own, so that diffusion
latents plug in unchanged (docs/paper.md, "Architecture"). For the SD-1.x family (DiT, SiT, SD1.5) that is
the encoder of `stabilityai/sd-vae-ft-ema` (scaling factor 0.18215); SDXL has its own VAE (0.13025). Scaling
and shift are read from the VAE's config, never hard-coded, so one class serves every latent space.
diffusers (the `pipeline` extra) is imported only when a VAE is loaded.

Latents follow the diffusers/DiT convention: `(posterior - shift_factor) * scaling_factor`, which is what a
diffusion model samples, so `decode(encode(x))` and `decode(diffusion_sample)` mean the same thing.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from infgen._extras import import_extra

# Input pixels per latent cell along each side for a KL-f8 VAE (SD-VAE, SDXL-VAE): the factor to assume when a
# latent's VAE is not at hand. A loaded VAE reports its own (FrozenVAE.downsample_factor). Not the pixel
# decoder's UPSAMPLE_FACTOR (output pixels per mask token), which is also 8 but a separate choice.
VAE_DOWNSAMPLE_FACTOR = 8
VAE_CONFIG_NAME = "config.json"
PIPELINE_VAE_SUBFOLDER = "vae"  # where a full diffusers pipeline keeps its VAE
# Images past this magnitude are almost surely in [0, 255] units, not [-1, 1]. The bound is loose on purpose:
# bicubic resizing overshoots [-1, 1] a little, and that input is fine.
IMAGE_MAGNITUDE_LIMIT = 1.5


class FrozenVAE:
    """An `AutoencoderKL` with gradients off, in eval mode, that speaks scaled latents.

    Not an nn.Module on purpose: a training module that holds a FrozenVAE must not pick up its weights in
    `parameters()` or `state_dict()`.
    """

    def __init__(self, autoencoder, source: str | None = None):
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.source = source  # the directory or hub id it came from (None when built in memory)
        config = autoencoder.config
        self._scaling_factor = float(config.scaling_factor)
        shift_factor = getattr(config, "shift_factor", None)
        self._shift_factor = float(shift_factor) if shift_factor is not None else 0.0
        # Each down block after the first halves the resolution: 4 blocks → ×8 (KL-f8).
        self._downsample_factor = 2 ** (len(config.block_out_channels) - 1)

    @classmethod
    def load(
        cls,
        source: str | Path,
        subfolder: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> FrozenVAE:
        """Load from a local directory or a Hugging Face hub id with `AutoencoderKL.from_pretrained`.

        A local directory may be a VAE directory (config.json + weights) or a full pipeline directory whose
        `vae/` subfolder holds one; the latter is detected. A hub id is passed through as is (give
        `subfolder="vae"` for a pipeline repo). Whether the hub may be contacted is up to the environment
        (HF_HUB_OFFLINE), as with any diffusers call.

        A source counts as a local path when it exists, or when it cannot be a hub id (absolute, starts with
        `.` or `~`, or has more than one `/`); a local path that does not exist raises FileNotFoundError.
        """
        # Imported here: `import infgen` must stay fast and must work without the pipeline extra.
        diffusers = import_extra("diffusers", "diffusers", "FrozenVAE.load")

        path = Path(source).expanduser()
        if path.exists():
            if subfolder is None and _is_pipeline_directory(path):
                subfolder = PIPELINE_VAE_SUBFOLDER
            vae_directory = path / subfolder if subfolder else path
            if not (vae_directory / VAE_CONFIG_NAME).is_file():
                raise FileNotFoundError(
                    f"{vae_directory} has no {VAE_CONFIG_NAME}: expected a diffusers AutoencoderKL directory "
                    f"or a pipeline directory with a {PIPELINE_VAE_SUBFOLDER}/ subfolder"
                )
            pretrained_name = str(path)
        elif _looks_like_local_path(str(source)):
            raise FileNotFoundError(f"VAE directory {source} does not exist")
        else:
            pretrained_name = str(source)  # hub id, e.g. "stabilityai/sd-vae-ft-ema"

        # low_cpu_mem_usage=False: the default needs `accelerate`; without it diffusers warns on every load
        autoencoder = diffusers.AutoencoderKL.from_pretrained(
            pretrained_name, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False
        )
        source_name = str(path / subfolder) if path.exists() and subfolder else pretrained_name
        return cls(autoencoder.to(device), source=source_name)

    @property
    def scaling_factor(self) -> float:
        return self._scaling_factor

    @property
    def shift_factor(self) -> float:
        return self._shift_factor

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return self._downsample_factor

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent grid for an image: ceil(H/8) × ceil(W/8), because encode pads up to a multiple of 8."""
        return math.ceil(height / self._downsample_factor), math.ceil(width / self._downsample_factor)

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → scaled latents (B, C, ceil(H/8), ceil(W/8)), float32.

        `sample=False` returns the posterior mean (deterministic); `sample=True` draws from the posterior with
        `generator`, the convention for diffusion training latents. Sides that are not a multiple of 8 are
        padded by edge replication first, so the last latent row/column covers a partly replicated cell.
        """
        posterior = self._posterior(images)
        latents = posterior.sample(generator=generator) if sample else posterior.mean
        return (latents.float() - self._shift_factor) * self._scaling_factor

    @torch.no_grad()
    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the posterior in scaled latent units, float32: a sample is `mean + std * noise`.

        For callers that draw the noise themselves, e.g. one seeded generator per sample so that a sample's
        latent does not depend on which batch it was encoded in.
        """
        posterior = self._posterior(images)
        mean = (posterior.mean.float() - self._shift_factor) * self._scaling_factor
        return mean, posterior.std.float() * self._scaling_factor

    def _posterior(self, images: torch.Tensor):
        _check_images(images)
        height, width = images.shape[-2:]
        latent_height, latent_width = self.latent_size(height, width)
        padded_height, padded_width = (
            latent_height * self._downsample_factor,
            latent_width * self._downsample_factor,
        )
        images = images.to(device=self.device, dtype=self.dtype)
        if (padded_height, padded_width) != (height, width):
            # replicate, not zeros: a black border would bleed into the edge latents
            images = F.pad(images, (0, padded_width - width, 0, padded_height - height), mode="replicate")
        return self.autoencoder.encode(images).latent_dist

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) → images (B, 3, 8h, 8w) in [-1, 1], float32: the stock decoder."""
        _check_latents(latents, self.latent_channels)
        latents = latents.float() / self._scaling_factor + self._shift_factor
        images = self.autoencoder.decode(latents.to(device=self.device, dtype=self.dtype)).sample
        return images.float().clamp(-1.0, 1.0)


def _is_pipeline_directory(path: Path) -> bool:
    """A diffusers pipeline directory: no VAE config at the top, one in `vae/`."""
    has_top_config = (path / VAE_CONFIG_NAME).is_file()
    return not has_top_config and (path / PIPELINE_VAE_SUBFOLDER / VAE_CONFIG_NAME).is_file()


def _looks_like_local_path(source: str) -> bool:
    """True for strings that cannot be a hub id ("name" or "owner/name")."""
    return (
        Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") > 1 or "\\" in source
    )


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    magnitude = images.abs().max().item()
    if magnitude > IMAGE_MAGNITUDE_LIMIT:
        raise ValueError(f"images must be in [-1, 1], got max |value| {magnitude:.3g} ([0, 255] input?)")


def _check_latents(latents: torch.Tensor, channels: int) -> None:
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(f"latents must be 4-D (B, {channels}, h, w), got shape {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or infinite values")
