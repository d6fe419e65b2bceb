"""Offline stand-ins, used only when the real weights or data are absent (no network, no local copy).

They are NOT SD-VAE and NOT photographs: they let every stage run and be tested end to end offline, and their
numbers say nothing about the real models.

    infgen.substitutes.embedded_vae  a small KL-f8 AutoencoderKL trained once on synthetic images, then cached
                                     (diffusers); its latents are not SD latents
    infgen.substitutes.synthetic     procedural, photo-like RGB images from a seed
"""
