"""The Qwen-Image DiffusionNFT rollout: FlowGRPO's rollout loop as a deterministic ODE, shared by both rollout pipelines.

DiffusionNFT trains on the forward process from the rollout's final clean latent, so the rollout
draws no SDE noise and computes no log-probabilities. :class:`QwenImageDiffusionNFTRolloutMixin`
runs :class:`~..qwen_image.rollout.QwenImageRolloutMixin`'s loop (the trainer's own step
functions, through :class:`~.diffusers_training_adapter.QwenImageDiffusionNFT`) at noise level 0
everywhere, i.e. the flow-match Euler ODE of diffusers' ``QwenImagePipeline``. What the trainer
needs goes in ``metadata["rl"]``, as verl-omni main's DiffusionNFT rollout records it
(:func:`diffusion_nft_rl`): ``latents_clean`` and ``train_timesteps``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_int
from ..qwen_image import PromptBatch
from .diffusers_training_adapter import QwenImageDiffusionNFT

__all__ = [
    "CLEAN_LATENTS_KEY",
    "SDE_OPTIONS",
    "TRAIN_TIMESTEPS_KEY",
    "QwenImageDiffusionNFTRolloutMixin",
    "diffusion_nft_rl",
    "nft_ode_options",
]

SDE_OPTIONS: tuple[str, ...] = ("noise_level", "sde_window_size", "sde_window_range", "sde_type", "logprobs")
"""FlowGRPO rollout options that a DiffusionNFT rollout fixes itself (it is deterministic)."""

CLEAN_LATENTS_KEY = "latents_clean"
"""Key of the final packed latents in ``metadata["rl"]`` (verl-omni main's DiffusionNFT key)."""

TRAIN_TIMESTEPS_KEY = "train_timesteps"
"""Key of the rollout's per-sample schedule in ``metadata["rl"]`` (verl-omni main's DiffusionNFT key)."""


def diffusion_nft_rl(latents: torch.Tensor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``rl`` metadata of a DiffusionNFT rollout: ``latents_clean`` and ``train_timesteps``.

    Args:
        latents: ``(B, S, C)`` final packed latents of the ODE.
        timesteps: ``(N,)`` the schedule the rollout ran (``scheduler.timesteps``).

    Returns:
        ``{"latents_clean": (B, S, C) float32, "train_timesteps": (B, N)}`` (their own memory, so a
        per-request slice does not keep the whole batch alive).

    Raises:
        ValueError: ``latents`` not 3-D or ``timesteps`` not 1-D.
    """
    if not isinstance(latents, torch.Tensor) or latents.ndim != 3:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"`latents` must be (batch, image tokens, channels), got {shape}")
    if not isinstance(timesteps, torch.Tensor) or timesteps.ndim != 1:
        shape = tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__
        raise ValueError(f"`timesteps` must be the (steps,) schedule, got {shape}")
    latents_clean = latents.float().clone()
    train_timesteps = timesteps.to(latents.device).unsqueeze(0).expand(latents.shape[0], -1).clone()
    return {CLEAN_LATENTS_KEY: latents_clean, TRAIN_TIMESTEPS_KEY: train_timesteps}


def nft_ode_options(num_inference_steps: int, return_trajectory: bool = False) -> dict[str, Any]:
    """FlowGRPO's rollout options that make its loop the deterministic ODE of an ``N``-step schedule.

    Noise level 0 at every step and no log-probs. The recorded window is the last step
    (``(x_{N-1}, x_N)``, ``x_N`` the clean latents) or, with ``return_trajectory``, the whole path.

    Raises:
        TypeError: ``return_trajectory`` is not a bool; ``num_inference_steps`` is not an int.
        ValueError: ``num_inference_steps`` < 1.
    """
    if not isinstance(return_trajectory, bool):
        raise TypeError(f"`return_trajectory` must be a bool, got {type(return_trajectory).__name__}")
    steps = check_int("`num_inference_steps`", num_inference_steps, 1)
    window = (0, steps) if return_trajectory else (steps - 1, steps)
    return {
        "noise_level": 0.0,
        "sde_window_size": window[1] - window[0],
        "sde_window_range": window,
        "sde_type": "sde",
        "logprobs": False,
    }


class QwenImageDiffusionNFTRolloutMixin:
    """Makes a Qwen-Image FlowGRPO rollout pipeline (diffusers' or vllm-omni's) the DiffusionNFT one.

    Put it before the FlowGRPO pipeline class in the bases. :meth:`start_rollout` replaces whatever SDE
    options it gets with :func:`nft_ode_options`; the steps run the trainer's adapter
    :class:`QwenImageDiffusionNFT` (:attr:`training_adapter`), so rollout and trainer predict the
    same velocity. :meth:`diffusion_nft_rl` is the output's ``metadata["rl"]``.
    """

    training_adapter: type[QwenImageDiffusionNFT] = QwenImageDiffusionNFT
    """The trainer-side adapter whose step functions the rollout runs."""

    algorithm: str = "diffusion_nft"
    """The registry algorithm of this pipeline (``DiffusionModelConfig.algorithm``)."""

    _nft_return_trajectory: bool = False

    def start_rollout(
        self,
        prompts: PromptBatch,
        *,
        num_inference_steps: int = 50,
        return_trajectory: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """FlowGRPO's ``start_rollout`` with :func:`nft_ode_options` in place of the SDE options.

        ``rollout`` (and vllm-omni's step execution) start here, so the whole run is the ODE: the
        clean latents ``(B, S, C)``, the recorded states ``(B, W + 1, S, C)`` and timesteps
        ``(B, W)`` (``W`` = 1, or N with ``return_trajectory``).

        Args:
            prompts: the encoded prompts, as ``QwenImageRolloutMixin.start_rollout``.
            num_inference_steps: number of denoising steps N.
            return_trajectory: record the whole ODE path instead of the last step; None: the
                pipeline's current setting (its ``forward`` argument).
            **kwargs: the other arguments of ``QwenImageRolloutMixin.start_rollout``; any of
                :data:`SDE_OPTIONS` among them is replaced.

        Returns:
            The ``RolloutRun`` at step 0.
        """
        if return_trajectory is None:
            return_trajectory = self._nft_return_trajectory
        kwargs.update(nft_ode_options(num_inference_steps, return_trajectory))
        return super().start_rollout(prompts, num_inference_steps=num_inference_steps, **kwargs)

    def diffusion_nft_rl(self, latents: torch.Tensor, timesteps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:func:`diffusion_nft_rl` of the final latents and the schedule the rollout ran.

        Args:
            latents: ``(B, S, C)`` final packed latents.
            timesteps: ``(N,)`` that schedule; default ``scheduler.timesteps``, which is it right after
                a request-batch rollout (requests in flight in vllm-omni's step mode each keep their own).
        """
        return diffusion_nft_rl(latents, self.scheduler.timesteps if timesteps is None else timesteps)
