"""Which frozen VAE encodes: a configured local path (or hub id, from the local cache), else the embedded
offline substitute. The latent stage, training's validation grid and the evaluation load it the same way."""

from __future__ import annotations

import torch

EMBEDDED_SOURCE = "embedded offline substitute (NOT SD-VAE)"


def load_frozen_vae(source: str | None, device: str = "cpu"):
    """(FrozenVAE, label). bf16 on GPU, fp32 on CPU; the label goes into every shard and the manifest."""
    from infgen.substitutes.embedded_vae import embedded_vae
    from infgen.vae import FrozenVAE

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if source is None:
        vae = embedded_vae()  # says plainly that it is the substitute
        vae.autoencoder.to(device=device)
        if dtype != vae.dtype:
            vae.autoencoder.to(dtype=dtype)
        return vae, EMBEDDED_SOURCE
    return FrozenVAE.load(source, device=device, dtype=dtype), str(source)
