"""Diffusion objectives and samplers for the prompt-conditioned model (sunfish.models.denoiser).

- ``masked``: absorbing-state (MDLM-style) diffusion over token ids, the default objective.
- ``continuous``: Gaussian diffusion in normalised embedding space (x0 prediction + rounding).
- ``guidance``: the classifier-free guidance combine shared by both.
- ``sample``: ``sample(model, prompt_ids, ...)``, one entry point for either objective.

The network predicts, the objective scores, the sampler decides.
"""

from sunfish.diffusion.guidance import combine, guided_log_probs
from sunfish.diffusion.sample import sample

__all__ = ["combine", "guided_log_probs", "sample"]
