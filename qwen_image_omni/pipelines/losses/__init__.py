"""The training losses of the RL algorithms, in one place; none depends on the architecture.

- :mod:`.diffusion_dpo`: the pairwise Diffusion-DPO loss (SD3 and Qwen-Image DPO);
- :mod:`.diffusion_nft`: the DiffusionNFT objective and its batch preparation.
"""

from .diffusion_dpo import diffusion_dpo_loss
from .diffusion_nft import (
    advantage_to_reward_prob,
    diffusion_nft_loss,
    forward_process_sample,
    group_advantages,
    select_train_timesteps,
)

__all__ = [
    "advantage_to_reward_prob",
    "diffusion_dpo_loss",
    "diffusion_nft_loss",
    "forward_process_sample",
    "group_advantages",
    "select_train_timesteps",
]
