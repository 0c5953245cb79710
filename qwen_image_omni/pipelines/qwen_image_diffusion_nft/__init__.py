"""Qwen-Image with DiffusionNFT: a forward-process objective on the ODE rollout's clean latents.

- :mod:`..losses.diffusion_nft`: the DiffusionNFT loss :func:`diffusion_nft_loss` and its batch preparation
  (:func:`group_advantages`, :func:`advantage_to_reward_prob`, :func:`select_train_timesteps`,
  :func:`forward_process_sample`), verl-omni main's math;
- :mod:`.diffusers_training_adapter`: :class:`QwenImageDiffusionNFT`, registered for
  ``("QwenImagePipeline", "diffusion_nft")``: inputs at a noised latent, the true-CFG prediction;
- :mod:`.rollout`: :class:`QwenImageDiffusionNFTRolloutMixin`, FlowGRPO's rollout loop as a
  deterministic ODE (:func:`nft_ode_options`) recording ``rl = {"latents_clean", "train_timesteps"}``
  (:func:`diffusion_nft_rl`), shared by both rollout pipelines;
- :mod:`.diffusers_rollout_pipeline`: :class:`DiffusersQwenImageDiffusionNFTPipeline`, the rollout on
  diffusers (also importable as ``QwenImageDiffusionNFTPipeline``, its former name);
- :mod:`.vllm_omni_rollout_pipeline`: its vllm-omni twin, verl-omni's ``QwenImageDiffusionNFTPipeline``,
  imported only when an engine asks for it by its dotted path.
"""

from ..model_base import VllmOmniPipelineBase
from .diffusers_rollout_pipeline import DiffusersQwenImageDiffusionNFTPipeline, QwenImageDiffusionNFTPipeline
from .diffusers_training_adapter import QwenImageDiffusionNFT
from ..losses.diffusion_nft import (
    ADV_MODES,
    advantage_to_reward_prob,
    diffusion_nft_loss,
    forward_process_sample,
    group_advantages,
    select_train_timesteps,
)
from .rollout import (
    CLEAN_LATENTS_KEY,
    SDE_OPTIONS,
    TRAIN_TIMESTEPS_KEY,
    QwenImageDiffusionNFTRolloutMixin,
    diffusion_nft_rl,
    nft_ode_options,
)

# The rollout pipelines, by dotted path: the vllm-omni one answers where vllm-omni is installed, and is
# imported only when asked for (an engine's custom_pipeline_name), never here.
VllmOmniPipelineBase.register_paths(
    "QwenImagePipeline",
    "diffusion_nft",
    diffusers=f"{__name__}.diffusers_rollout_pipeline.QwenImageDiffusionNFTPipeline",
    vllm_omni=f"{__name__}.vllm_omni_rollout_pipeline.QwenImageDiffusionNFTPipeline",
)

__all__ = [
    "ADV_MODES",
    "CLEAN_LATENTS_KEY",
    "SDE_OPTIONS",
    "TRAIN_TIMESTEPS_KEY",
    "DiffusersQwenImageDiffusionNFTPipeline",
    "QwenImageDiffusionNFT",
    "QwenImageDiffusionNFTPipeline",
    "QwenImageDiffusionNFTRolloutMixin",
    "advantage_to_reward_prob",
    "diffusion_nft_loss",
    "diffusion_nft_rl",
    "forward_process_sample",
    "group_advantages",
    "nft_ode_options",
    "select_train_timesteps",
]
