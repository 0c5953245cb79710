"""Qwen-Image with DiffusionNFT: a forward-process objective on the ODE rollout's clean latents.

- :mod:`.loss`: the DiffusionNFT loss :func:`diffusion_nft_loss` and its batch preparation
  (:func:`group_advantages`, :func:`advantage_to_reward_prob`, :func:`select_train_timesteps`,
  :func:`forward_process_sample`), verl-omni main's math;
- :mod:`.diffusers_training_adapter`: :class:`QwenImageDiffusionNFT`, registered for
  ``("QwenImagePipeline", "diffusion_nft")``: inputs at a noised latent, the true-CFG prediction;
- :mod:`.diffusers_rollout_pipeline`: :class:`QwenImageDiffusionNFTPipeline`, the deterministic
  rollout on diffusers that records ``rl = {"latents_clean", "train_timesteps"}``.

No text length is computed or passed: the transformer takes it from ``encoder_hidden_states.shape[1]``.
"""

from .diffusers_rollout_pipeline import SDE_OPTIONS, QwenImageDiffusionNFTPipeline, diffusion_nft_rl
from .diffusers_training_adapter import QwenImageDiffusionNFT
from .loss import (
    ADV_MODES,
    advantage_to_reward_prob,
    diffusion_nft_loss,
    forward_process_sample,
    group_advantages,
    select_train_timesteps,
)

__all__ = [
    "ADV_MODES",
    "SDE_OPTIONS",
    "QwenImageDiffusionNFT",
    "QwenImageDiffusionNFTPipeline",
    "advantage_to_reward_prob",
    "diffusion_nft_loss",
    "diffusion_nft_rl",
    "forward_process_sample",
    "group_advantages",
    "select_train_timesteps",
]
