"""Qwen-Image with Diffusion-DPO: the training adapter and the rollout pipelines, one file each.

- :mod:`.diffusers_training_adapter`: :class:`QwenImageDPO`, registered for
  ``("QwenImagePipeline", "dpo")``: the 1000-step training scheduler, transformer inputs for
  already-noised latents, the (true-CFG) velocity prediction;
- :mod:`.rollout`: :class:`QwenImageDPORolloutMixin`, FlowGRPO's rollout loop as a deterministic
  ODE (:func:`ode_rollout_options`), shared by both rollout pipelines;
- :mod:`.diffusers_rollout_pipeline`: :class:`QwenImageDPOPipeline` on diffusers, recording the clean
  latents as ``rl["latents_clean"]``;
- :mod:`.vllm_omni_rollout_pipeline`: its vllm-omni twin, imported only with vllm-omni installed.

The pairwise loss is :func:`diffusion_dpo_loss` (the one of :mod:`..sd3_dpo`, re-exported: it only
compares predictions with the ``noise - latents`` target, whatever the model). No text length is
passed anywhere: the transformer takes it from ``encoder_hidden_states.shape[1]``.
"""

from ..sd3_dpo import diffusion_dpo_loss
from .diffusers_rollout_pipeline import QwenImageDPOPipeline
from .diffusers_training_adapter import QwenImageDPO
from .rollout import CLEAN_LATENTS_KEY, SDE_ROLLOUT_OPTIONS, QwenImageDPORolloutMixin, ode_rollout_options

__all__ = [
    "CLEAN_LATENTS_KEY",
    "SDE_ROLLOUT_OPTIONS",
    "QwenImageDPO",
    "QwenImageDPOPipeline",
    "QwenImageDPORolloutMixin",
    "diffusion_dpo_loss",
    "ode_rollout_options",
]
