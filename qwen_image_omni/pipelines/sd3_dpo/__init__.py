"""Stable Diffusion 3 Diffusion-DPO: the training adapter, registered for ``("StableDiffusion3Pipeline", "dpo")``.

``diffusion_dpo_loss`` is re-exported from :mod:`..losses` for the adapter's users.
"""

from ..losses import diffusion_dpo_loss
from .diffusers_training_adapter import SD3_SCHEDULER_CONFIG, StableDiffusion3DPO

__all__ = ["SD3_SCHEDULER_CONFIG", "StableDiffusion3DPO", "diffusion_dpo_loss"]
