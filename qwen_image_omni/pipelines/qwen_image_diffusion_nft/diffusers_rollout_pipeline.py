"""Qwen-Image DiffusionNFT rollout pipeline on diffusers: deterministic ODE images plus the clean latents.

DiffusionNFT trains on the forward process from the rollout's final clean latent, so the rollout
draws no SDE noise and computes no log-probabilities: it is FlowGRPO's rollout loop
(:class:`~..qwen_image.rollout.QwenImageRolloutMixin`) at noise level 0 everywhere, i.e. the
flow-match Euler ODE of diffusers' ``QwenImagePipeline``. What the trainer needs goes in
``rl`` (``metadata["rl"]`` of the output envelope), as verl-omni main's DiffusionNFT rollout records it:

- ``latents_clean``: ``(B, S, C)`` float32 final packed latents;
- ``train_timesteps``: ``(B, N)`` the rollout's whole schedule (``scheduler.timesteps`` per sample),
  from which the trainer draws its training timesteps (:func:`~..losses.diffusion_nft.select_train_timesteps`).

No length argument anywhere: prompt embeddings go in at any padded width.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from ..qwen_image import QwenImageRolloutOutput
from ..qwen_image_flow_grpo.diffusers_rollout_pipeline import DiffusersQwenImagePipelineWithLogProb
from .rollout import SDE_OPTIONS, QwenImageDiffusionNFTRolloutMixin, diffusion_nft_rl

__all__ = ["SDE_OPTIONS", "DiffusersQwenImageDiffusionNFTPipeline", "QwenImageDiffusionNFTPipeline", "diffusion_nft_rl"]


class DiffusersQwenImageDiffusionNFTPipeline(QwenImageDiffusionNFTRolloutMixin, DiffusersQwenImagePipelineWithLogProb):
    """Rollout pipeline for Qwen-Image with DiffusionNFT: the deterministic ODE, clean latents recorded.

    :class:`DiffusersQwenImagePipelineWithLogProb` (same components, prompt handling, CFG and decoding) with
    :class:`~.rollout.QwenImageDiffusionNFTRolloutMixin`: noise level 0 at every step and no
    log-probabilities; its steps go through :class:`~.diffusers_training_adapter.QwenImageDiffusionNFT`
    (the trainer's adapter). The output's ``rl`` holds ``latents_clean`` and ``train_timesteps``
    (see the module docstring). ``all_latents`` / ``all_timesteps`` hold the last ODE transition
    only, ``(B, 2, S, C)`` / ``(B, 1)``, or the whole ODE path ``(B, N + 1, S, C)`` / ``(B, N)`` with
    ``return_trajectory=True``. With vllm-omni installed, ``VllmOmniPipelineBase`` maps
    ``("QwenImagePipeline", "diffusion_nft")`` to the vllm-omni twin, which runs the same mixin.
    """

    def forward(self, *args: Any, return_trajectory: bool = False, **kwargs: Any) -> QwenImageRolloutOutput:
        """End-to-end deterministic generation; arguments as :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.

        Takes the prompt (token ids or embeddings of any padded width), CFG, size, steps, sigmas,
        generator, latents, ``output_type``, ... of the FlowGRPO pipeline; not its SDE options
        (:data:`SDE_OPTIONS`), which the ODE fixes.

        Args:
            *args: positional arguments of :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.
            return_trajectory: record every ODE state in ``all_latents`` (else the last transition).
            **kwargs: keyword arguments of :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.

        Returns:
            QwenImageRolloutOutput: images, ``all_log_probs=None``, the prompt embeddings used, and
            ``rl = {"latents_clean", "train_timesteps"}``.

        Raises:
            TypeError: an SDE option, an unknown argument, or a non-bool ``return_trajectory``.
            ValueError, TypeError: as :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.
        """
        if not isinstance(return_trajectory, bool):
            raise TypeError(f"`return_trajectory` must be a bool, got {type(return_trajectory).__name__}")
        refused = [name for name in SDE_OPTIONS if name in kwargs]
        signature = inspect.signature(DiffusersQwenImagePipelineWithLogProb.forward)
        positional = list(signature.parameters)[1 : 1 + len(args)]
        refused += [name for name in positional if name in SDE_OPTIONS]
        if refused:
            raise TypeError(
                f"the DiffusionNFT rollout is a deterministic ODE (noise level 0, no log-probs); "
                f"it takes no {sorted(set(refused))}"
            )
        self._nft_return_trajectory = return_trajectory
        try:
            out = super().forward(*args, **kwargs)
        finally:
            self._nft_return_trajectory = False
        return dataclasses.replace(out, rl=self.diffusion_nft_rl(out.all_latents[:, -1]))


QwenImageDiffusionNFTPipeline = DiffusersQwenImageDiffusionNFTPipeline
"""The pipeline's former name, kept for the code and configs that name it. The vllm-omni rollout
pipeline carries it now (verl-omni's name); where vllm-omni is not installed, the rollout registry
answers this path for ``("QwenImagePipeline", "diffusion_nft")``."""
