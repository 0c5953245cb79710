"""Qwen-Image with Diffusion-DPO: the training adapter and the rollout pipelines, one file each.

- :mod:`.diffusers_training_adapter`: :class:`QwenImageDPO`, registered for
  ``("QwenImagePipeline", "dpo")``: the 1000-step training scheduler, transformer inputs for
  already-noised latents, the (true-CFG) velocity prediction;
- :mod:`.rollout`: :class:`QwenImageDPORolloutMixin`, FlowGRPO's rollout loop as a deterministic
  ODE (:func:`ode_rollout_options`), shared by both rollout pipelines;
- :mod:`.diffusers_rollout_pipeline`: :class:`DiffusersQwenImageDPOPipeline` on diffusers (also
  importable as ``QwenImageDPOPipeline``, its former name), recording the clean latents as
  ``rl["latents_clean"]``;
- :mod:`.vllm_omni_rollout_pipeline`: its vllm-omni twin, verl-omni's ``QwenImageDPOPipeline``,
  imported only when an engine asks for it by its dotted path.

The pairwise loss is :func:`diffusion_dpo_loss` (:mod:`..losses`, re-exported: it only compares
predictions with the ``noise - latents`` target, whatever the model).
"""

from ..losses import diffusion_dpo_loss
from ..model_base import VllmOmniPipelineBase
from .diffusers_rollout_pipeline import DiffusersQwenImageDPOPipeline, QwenImageDPOPipeline
from .diffusers_training_adapter import QwenImageDPO
from .rollout import CLEAN_LATENTS_KEY, SDE_ROLLOUT_OPTIONS, QwenImageDPORolloutMixin, ode_rollout_options

# The rollout pipelines, by dotted path: the vllm-omni one answers where vllm-omni is installed, and is
# imported only when asked for (an engine's custom_pipeline_name), never here.
VllmOmniPipelineBase.register_paths(
    "QwenImagePipeline",
    "dpo",
    diffusers=f"{__name__}.diffusers_rollout_pipeline.QwenImageDPOPipeline",
    vllm_omni=f"{__name__}.vllm_omni_rollout_pipeline.QwenImageDPOPipeline",
)

__all__ = [
    "CLEAN_LATENTS_KEY",
    "SDE_ROLLOUT_OPTIONS",
    "DiffusersQwenImageDPOPipeline",
    "QwenImageDPO",
    "QwenImageDPOPipeline",
    "QwenImageDPORolloutMixin",
    "diffusion_dpo_loss",
    "ode_rollout_options",
]
