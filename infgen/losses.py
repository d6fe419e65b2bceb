"""The decoder's training loss: L1 + λ_P·LPIPS + λ_G·hinge-GAN (docs/paper.md, "Training").

Pure functions come first, then `DecoderLoss`, which owns the frozen LPIPS and the PatchGAN discriminator
and exposes the generator and discriminator objectives as two methods that return dicts (no `optimizer_idx`).
Nothing here logs: the training loop prefixes and logs the returned values. Images are in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from infgen.discriminator import DiscriminatorConfig, NLayerDiscriminator


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 · (mean(relu(1 − real)) + mean(relu(1 + fake))), taming's `hinge_d_loss`."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """−mean(fake): the generator raises D's logits on its outputs (taming's generator term)."""
    return -logits_fake.mean()


def gan_weight(step: int, start_step: int, weight: float) -> float:
    """`weight` from `start_step` on, 0 before, as taming `adopt_weight`: D first sees decent outputs."""
    return weight if step >= start_step else 0.0


def random_crop_pair(
    prediction: torch.Tensor,
    target: torch.Tensor,
    crop_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random crop (≤ crop_size on each side) of two (..., H, W) tensors; unchanged if already small.

    LPIPS and the discriminator run on these crops so that their activation memory at 2048² targets is that
    of a 512² image (docs/paper.md, "Defaults where the paper is silent"). One offset serves the whole batch;
    `generator` is a CPU one.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in size"
        )
    height, width = prediction.shape[-2:]
    if height <= crop_size and width <= crop_size:
        return prediction, target
    crop_height, crop_width = min(height, crop_size), min(width, crop_size)
    top = int(torch.randint(height - crop_height + 1, (1,), generator=generator))
    left = int(torch.randint(width - crop_width + 1, (1,), generator=generator))
    rows, columns = slice(top, top + crop_height), slice(left, left + crop_width)
    return prediction[..., rows, columns], target[..., rows, columns]


@dataclass(frozen=True)
class LossConfig:
    l1_weight: float = 1.0
    perceptual_weight: float = 0.1  # λ_P, the paper's value
    gan_weight: float = 0.1  # λ_G, the paper's value; fixed, no adaptive weight (docs/paper.md, "Training")
    gan_start_step: int = 50_000  # not in the paper; about 10% of stage 1
    perceptual_crop: int = 512  # side of the crop that LPIPS and the discriminator see
    lpips_trunk_weights: str | None = None  # None: $INFGEN_LPIPS_TRUNK, then torch's hub cache (perceptual)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


class DecoderLoss(nn.Module):
    """Generator and discriminator objectives of the decoder, each returned as a dict of scalar tensors.

    The training loop owns the optimizers: it steps the decoder on `generator_loss(...)["total"]` and the
    discriminator (`self.discriminator.parameters()`) on `discriminator_loss(...)["discriminator"]`.
    `perceptual` overrides the LPIPS module that the config would load (tests reuse one instance).
    """

    def __init__(self, config: LossConfig | None = None, perceptual: nn.Module | None = None):
        super().__init__()
        self.config = config or LossConfig()
        if perceptual is None:
            # Imported here: LPIPS needs the pipeline extra (lpips), and importing this module must not.
            from infgen.metrics.perceptual import load_lpips

            perceptual = load_lpips(self.config.lpips_trunk_weights)
        self.perceptual = perceptual
        self.perceptual.requires_grad_(False).eval()
        self.discriminator = NLayerDiscriminator(self.config.discriminator)

    @property
    def trunk_is_pretrained(self) -> bool:
        """False when LPIPS runs on a random trunk: label the perceptual numbers accordingly."""
        return bool(getattr(self.perceptual, "trunk_is_pretrained", False))

    def train(self, mode: bool = True) -> DecoderLoss:
        super().train(mode)
        self.perceptual.eval()  # a fixed metric: its linear heads' dropout must stay off in training
        return self

    def gan_active(self, step: int) -> bool:
        return gan_weight(step, self.config.gan_start_step, self.config.gan_weight) > 0

    def generator_loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        step: int,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Keys "l1", "perceptual", "gan" (unweighted) and "total" (weighted sum, the one to backpropagate).

        "gan" is exactly 0, and D is not run, before `gan_start_step`. Gradients flow through D into
        `prediction`, but none land in D's parameters (see `_logits_for_generator`).
        """
        config = self.config
        l1 = F.l1_loss(prediction, target)  # the full image: cheap even at 2048²
        prediction_crop, target_crop = random_crop_pair(prediction, target, config.perceptual_crop, generator)
        perceptual = self.perceptual(prediction_crop, target_crop).mean()  # (B, 1, 1, 1) → ()
        weight = gan_weight(step, config.gan_start_step, config.gan_weight)
        if weight > 0:
            gan = hinge_generator_loss(self._logits_for_generator(prediction_crop))
        else:
            gan = prediction.new_zeros(())
        total = config.l1_weight * l1 + config.perceptual_weight * perceptual + weight * gan
        return {"l1": l1, "perceptual": perceptual, "gan": gan, "total": total}

    def discriminator_loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        step: int,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Keys "discriminator" (hinge loss), "logits_real" and "logits_fake" (detached mean logits).

        `prediction` is detached, so this never backpropagates into the decoder. Before `gan_start_step` D is
        not run: "discriminator" is a zero still connected to D's parameters, so `.backward()` works in a
        uniform loop and gives all-zero gradients (skipping the D optimizer step then is cheaper still).
        """
        if not self.gan_active(step):
            zero = prediction.new_zeros(())
            unused = 0.0 * sum(parameter.sum() for parameter in self.discriminator.parameters())
            return {"discriminator": unused, "logits_real": zero, "logits_fake": zero}
        fake, real = random_crop_pair(prediction.detach(), target, self.config.perceptual_crop, generator)
        # One pass over both halves: GroupNorm normalizes each image alone, so this equals two passes.
        logits_real, logits_fake = self.discriminator(torch.cat([real, fake])).chunk(2)
        return {
            "discriminator": hinge_discriminator_loss(logits_real, logits_fake),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }

    def _logits_for_generator(self, images: torch.Tensor) -> torch.Tensor:
        # D runs with detached copies of its parameters: the generator's backward then reaches `images` but
        # leaves no gradient in D's .grad (which a later D step would apply unless the loop zeroed it), and
        # skips computing those weight gradients at all. No requires_grad toggling, which DDP dislikes.
        # Assumes D's parameters are whole tensors (not ZeRO-3 partitions).
        detached = {name: parameter.detach() for name, parameter in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, detached, (images,))
