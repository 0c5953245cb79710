"""Qwen-Image DiffusionNFT rollout pipeline on diffusers: deterministic ODE images plus the clean latents.

DiffusionNFT trains on the forward process from the rollout's final clean latent, so the rollout
draws no SDE noise and computes no log-probabilities: it is FlowGRPO's rollout loop
(:class:`~..qwen_image_flow_grpo.rollout.QwenImageRolloutMixin`) at noise level 0 everywhere, i.e. the
flow-match Euler ODE of diffusers' ``QwenImagePipeline``. What the trainer needs goes in
``rl`` (``metadata["rl"]`` of the output envelope), as verl-omni main's DiffusionNFT rollout records it:

- ``latents_clean``: ``(B, S, C)`` float32 final packed latents;
- ``train_timesteps``: ``(B, N)`` the rollout's whole schedule (``scheduler.timesteps`` per sample),
  from which the trainer draws its training timesteps (:func:`~.loss.select_train_timesteps`).

No length argument anywhere: prompt embeddings go in at any padded width.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from ..checks import check_int
from ..model_base import VllmOmniPipelineBase
from ..qwen_image_flow_grpo.diffusers_rollout_pipeline import QwenImagePipelineWithLogProb
from ..qwen_image_flow_grpo.rollout import QwenImageRolloutOutput
from .diffusers_training_adapter import QwenImageDiffusionNFT

__all__ = ["SDE_OPTIONS", "QwenImageDiffusionNFTPipeline", "diffusion_nft_rl"]

SDE_OPTIONS: tuple[str, ...] = ("noise_level", "sde_window_size", "sde_window_range", "sde_type", "logprobs")
"""FlowGRPO rollout options that a DiffusionNFT rollout fixes itself (it is deterministic) and refuses."""


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
    return {"latents_clean": latents_clean, "train_timesteps": train_timesteps}


@VllmOmniPipelineBase.register("QwenImagePipeline", algorithm="diffusion_nft")
class QwenImageDiffusionNFTPipeline(QwenImagePipelineWithLogProb):
    """Rollout pipeline for Qwen-Image with DiffusionNFT: the deterministic ODE, clean latents recorded.

    :class:`QwenImagePipelineWithLogProb` (same components, prompt handling, CFG and decoding) run
    with noise level 0 at every step and no log-probabilities; its steps go through
    :class:`QwenImageDiffusionNFT` (the trainer's adapter). The output's ``rl`` holds
    ``latents_clean`` and ``train_timesteps`` (see the module docstring). ``all_latents`` /
    ``all_timesteps`` hold the last ODE transition only, ``(B, 2, S, C)`` / ``(B, 1)``, or the whole
    ODE path ``(B, N + 1, S, C)`` / ``(B, N)`` with ``return_trajectory=True``.
    """

    training_adapter = QwenImageDiffusionNFT
    algorithm = "diffusion_nft"

    def forward(self, *args: Any, return_trajectory: bool = False, **kwargs: Any) -> QwenImageRolloutOutput:
        """End-to-end deterministic generation; arguments as :meth:`QwenImagePipelineWithLogProb.forward`.

        Takes the prompt (token ids or embeddings of any padded width), CFG, size, steps, sigmas,
        generator, latents, ``output_type``, ... of the FlowGRPO pipeline; not its SDE options
        (:data:`SDE_OPTIONS`), which the ODE fixes.

        Args:
            *args: positional arguments of :meth:`QwenImagePipelineWithLogProb.forward`.
            return_trajectory: record every ODE state in ``all_latents`` (else the last transition).
            **kwargs: keyword arguments of :meth:`QwenImagePipelineWithLogProb.forward`.

        Returns:
            QwenImageRolloutOutput: images, ``all_log_probs=None``, the prompt embeddings used, and
            ``rl = {"latents_clean", "train_timesteps"}``.

        Raises:
            TypeError: an SDE option, an unknown argument, or a non-bool ``return_trajectory``.
            ValueError, TypeError: as :meth:`QwenImagePipelineWithLogProb.forward`.
        """
        if not isinstance(return_trajectory, bool):
            raise TypeError(f"`return_trajectory` must be a bool, got {type(return_trajectory).__name__}")
        refused = [name for name in SDE_OPTIONS if name in kwargs]
        signature = inspect.signature(QwenImagePipelineWithLogProb.forward)
        positional = list(signature.parameters)[1 : 1 + len(args)]
        refused += [name for name in positional if name in SDE_OPTIONS]
        if refused:
            raise TypeError(
                f"the DiffusionNFT rollout is a deterministic ODE (noise level 0, no log-probs); "
                f"it takes no {sorted(set(refused))}"
            )
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        steps = check_int("`num_inference_steps`", arguments["num_inference_steps"], 1)
        window = (0, steps) if return_trajectory else (steps - 1, steps)
        out = super().forward(
            **{
                **arguments,
                "noise_level": 0.0,
                "sde_type": "sde",
                "sde_window_size": window[1] - window[0],
                "sde_window_range": window,
                "logprobs": False,
            }
        )
        fields = {field.name: getattr(out, field.name) for field in dataclasses.fields(out)}
        fields["rl"] = diffusion_nft_rl(out.all_latents[:, -1], self.scheduler.timesteps)
        return QwenImageRolloutOutput(**fields)
