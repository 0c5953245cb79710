"""Stable Diffusion 3 training adapter for Diffusion-DPO (the loss: :mod:`..losses.diffusion_dpo`).

``StableDiffusion3DPO`` (registered for ``("StableDiffusion3Pipeline", "dpo")``) only prepares
``diffusers.SD3Transformer2DModel`` inputs and runs the (optionally guided) forward. DPO trains on
the forward (noising) process, so there is no reverse step to sample:
``forward_and_sample_previous_step`` raises ``NotImplementedError``.

One training step, for a batch of preference pairs laid out row by row (rows ``2i`` and ``2i + 1``
are the chosen and rejected image of pair ``i``; both rows share the noise and the timestep)::

    sigma = sigmas[idx].view(-1, 1, 1, 1)                 # flow matching: x_t = (1 - sigma) x_0 + sigma eps
    noisy = (1 - sigma) * latents + sigma * noise
    target = noise - latents                              # the velocity SD3 predicts
    inputs, neg = StableDiffusion3DPO.prepare_model_inputs(module, config, noisy, sigma.flatten() * 1000,
                                                           prompt_embeds, None, None, None, micro_batch, 0)
    pred = StableDiffusion3DPO.forward(module, config, inputs, neg)
    with torch.no_grad():
        ref = StableDiffusion3DPO.forward(ref_module, config, inputs, neg)
    loss, metrics = diffusion_dpo_loss(pred, ref, target, beta=2500.0)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..checks import check_int, check_step
from ..model_base import DiffusionModelBase

if TYPE_CHECKING:
    from diffusers import ModelMixin, SchedulerMixin

    from ..config import DiffusionModelConfig

__all__ = ["SD3_SCHEDULER_CONFIG", "StableDiffusion3DPO"]

SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
"""``scheduler/scheduler_config.json`` of the SD3 / SD3.5 checkpoints, used when none is on disk."""


def _check_tensor(name: str, value: Any, ndims: tuple[int, ...]) -> torch.Tensor:
    """Return ``value`` if it is a tensor with one of ``ndims`` dimensions, else raise naming ``name``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim not in ndims:
        expected = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {expected} dimensions, got shape {tuple(value.shape)}")
    return value


def _check_width(name: str, tensor: torch.Tensor, module: Any, config_key: str) -> None:
    """Check ``tensor``'s last dimension against ``module.config[config_key]`` when the module has one."""
    expected = getattr(getattr(module, "config", None), config_key, None)
    if isinstance(expected, int) and tensor.shape[-1] != expected:
        raise ValueError(
            f"{name} must have last dimension {config_key}={expected}, got shape {tuple(tensor.shape)}"
        )


def _check_batch(name: str, tensor: torch.Tensor, batch: int) -> None:
    """Check that ``tensor`` holds ``batch`` rows."""
    if tensor.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} (that of latents), got shape {tuple(tensor.shape)}")


@DiffusionModelBase.register("StableDiffusion3Pipeline", "dpo")
class StableDiffusion3DPO(DiffusionModelBase):
    """Training adapter for SD3 / SD3.5 Diffusion-DPO.

    Limited to SD3 tensor preparation and the transformer forward; the pairwise objective is
    :func:`diffusion_dpo_loss`. Classifier-free guidance is on when
    ``model_config.pipeline.guidance_scale > 1`` (SD3's guidance knob, as in diffusers'
    ``StableDiffusion3Pipeline``); ``true_cfg_scale`` is Qwen-Image's and is not read here.
    """

    @classmethod
    def build_scheduler(cls, model_config: DiffusionModelConfig) -> FlowMatchEulerDiscreteScheduler:
        """Build SD3's flow-matching Euler scheduler.

        Loaded from ``model_config.local_path/scheduler`` when that folder exists, else built
        from :data:`SD3_SCHEDULER_CONFIG`. Timesteps stay those of the full training schedule
        (see :meth:`set_timesteps`).
        """
        local_path = model_config.local_path
        if local_path is not None and os.path.isdir(os.path.join(local_path, "scheduler")):
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(local_path, subfolder="scheduler")
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG)
        return scheduler

    @classmethod
    def set_timesteps(cls, scheduler: SchedulerMixin, model_config: DiffusionModelConfig, device: str | torch.device):
        """No-op for SD3 DPO training.

        DPO samples training timesteps from the full ``num_train_timesteps`` schedule (e.g.
        logit-normal over ~1000 steps); rollouts and offline data preparation use diffusers
        pipelines with their own inference schedulers, not this hook.
        """

    @classmethod
    def prepare_model_inputs(
        cls,
        module: ModelMixin,
        model_config: DiffusionModelConfig,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_embeds_mask: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds_mask: torch.Tensor | None,
        micro_batch: Mapping[str, Any] | None,
        step: int,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Build ``SD3Transformer2DModel`` keyword arguments.

        Args:
            module: the SD3 transformer; when it has a ``config``, channel and embedding widths are
                checked against it.
            model_config: ``pipeline.guidance_scale > 1`` turns on classifier-free guidance.
            latents: ``(B, C, H, W)`` already-noised latents, or a ``(B, T, C, H, W)`` trajectory
                from which ``step`` selects one.
            timesteps: ``(B,)`` timesteps on the ``[0, num_train_timesteps]`` scale (``sigma * 1000``),
                a scalar for the whole batch, or ``(B, T)`` with a trajectory.
            prompt_embeds: ``(B, L, joint_attention_dim)`` CLIP + T5 prompt embeddings.
            prompt_embeds_mask: accepted for interface compatibility and unused: SD3 attends to every
                text position, as diffusers' pipeline does (``JointAttnProcessor2_0`` ignores masks).
            negative_prompt_embeds: ``(B, L', joint_attention_dim)``; required when guidance is on.
            negative_prompt_embeds_mask: unused, as ``prompt_embeds_mask``.
            micro_batch: must hold ``"pooled_prompt_embeds"`` ``(B, pooled_projection_dim)``, and
                ``"negative_pooled_prompt_embeds"`` when guidance is on.
            step: trajectory index (an int), used only with ``(B, T, ...)`` latents.

        Returns:
            ``(model_inputs, negative_model_inputs)`` with keys ``hidden_states``, ``timestep``,
            ``encoder_hidden_states``, ``pooled_projections``; the negative dict shares latents and
            timesteps and is ``None`` without guidance.

        Raises:
            TypeError / ValueError: a missing input, or a shape that does not fit the module.
        """
        del prompt_embeds_mask, negative_prompt_embeds_mask
        micro_batch = {} if micro_batch is None else micro_batch
        latents = _check_tensor("latents", latents, (4, 5))
        timesteps = _check_tensor("timesteps", timesteps, (0, 1, 2))
        step = check_int("`step`", step, 0)
        if latents.ndim == 5:
            if timesteps.ndim != 2:
                raise ValueError(
                    f"timesteps must be (B, T) with (B, T, C, H, W) latents, got shape {tuple(timesteps.shape)}"
                )
            latents = latents[:, check_step(step, latents, "latents")]
            timesteps = timesteps[:, check_step(step, timesteps, "timesteps")]
        elif timesteps.ndim == 2:
            raise ValueError(
                f"timesteps must be (B,) or a scalar with (B, C, H, W) latents, got shape {tuple(timesteps.shape)}"
            )
        batch = latents.shape[0]
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        _check_batch("timesteps", timesteps, batch)
        expected_channels = getattr(getattr(module, "config", None), "in_channels", None)
        if isinstance(expected_channels, int) and latents.shape[1] != expected_channels:
            raise ValueError(
                f"latents must have in_channels={expected_channels} channels (dim 1), got shape {tuple(latents.shape)}"
            )

        pooled = micro_batch.get("pooled_prompt_embeds", None)
        if pooled is None:
            raise ValueError("micro_batch['pooled_prompt_embeds'] is required: SD3 conditions on pooled projections")
        positive = cls.build_transformer_inputs(module, latents, timesteps, prompt_embeds, pooled, prefix="")

        guidance_scale = model_config.pipeline.guidance_scale
        if guidance_scale is None or guidance_scale <= 1.0:
            return positive, None
        negative_pooled = micro_batch.get("negative_pooled_prompt_embeds", None)
        if negative_prompt_embeds is None or negative_pooled is None:
            missing = [
                name
                for name, value in (
                    ("negative_prompt_embeds", negative_prompt_embeds),
                    ("micro_batch['negative_pooled_prompt_embeds']", negative_pooled),
                )
                if value is None
            ]
            raise ValueError(f"pipeline.guidance_scale={guidance_scale} > 1 turns on guidance, which needs {missing}")
        negative = cls.build_transformer_inputs(
            module, latents, timesteps, negative_prompt_embeds, negative_pooled, prefix="negative_"
        )
        return positive, negative

    @staticmethod
    def build_transformer_inputs(
        module: ModelMixin | None,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        prefix: str = "",
    ) -> dict[str, Any]:
        """Check one prompt's tensors and return the ``SD3Transformer2DModel`` keyword arguments.

        ``prefix`` (``""`` or ``"negative_"``) only names the arguments in error messages.
        """
        batch = latents.shape[0]
        prompt_embeds = _check_tensor(f"{prefix}prompt_embeds", prompt_embeds, (3,))
        pooled_prompt_embeds = _check_tensor(f"{prefix}pooled_prompt_embeds", pooled_prompt_embeds, (2,))
        _check_batch(f"{prefix}prompt_embeds", prompt_embeds, batch)
        _check_batch(f"{prefix}pooled_prompt_embeds", pooled_prompt_embeds, batch)
        _check_width(f"{prefix}prompt_embeds", prompt_embeds, module, "joint_attention_dim")
        _check_width(f"{prefix}pooled_prompt_embeds", pooled_prompt_embeds, module, "pooled_projection_dim")
        return {
            "hidden_states": latents,
            "timestep": timesteps,
            "encoder_hidden_states": prompt_embeds,
            "pooled_projections": pooled_prompt_embeds,
        }

    @classmethod
    def forward(
        cls,
        module: ModelMixin,
        model_config: DiffusionModelConfig,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None,
    ) -> torch.Tensor:
        """Run the transformer and return its (guided) velocity prediction, shaped like the latents.

        With ``pipeline.guidance_scale = s > 1`` the result is ``neg + s * (pos - neg)``.

        Raises:
            ValueError: guidance is on and ``negative_model_inputs`` is ``None``.
        """
        prediction = module(**model_inputs, return_dict=False)[0]
        guidance_scale = model_config.pipeline.guidance_scale
        if guidance_scale is None or guidance_scale <= 1.0:
            return prediction
        if negative_model_inputs is None:
            raise ValueError(f"pipeline.guidance_scale={guidance_scale} > 1 needs negative_model_inputs, got None")
        negative = module(**negative_model_inputs, return_dict=False)[0]
        return negative + guidance_scale * (prediction - negative)

    @classmethod
    def forward_and_sample_previous_step(
        cls,
        module: ModelMixin,
        scheduler: SchedulerMixin,
        model_config: DiffusionModelConfig,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None,
        scheduler_inputs: Mapping[str, torch.Tensor] | None,
        step: int,
    ) -> tuple:
        """Not available: Diffusion-DPO has no reverse-sampling step or log-probability.

        Raises:
            NotImplementedError: always; use :meth:`forward` and :func:`diffusion_dpo_loss`.
        """
        raise NotImplementedError(
            "StableDiffusion3DPO trains Diffusion-DPO on the forward (noising) process and has no reverse step "
            "or log-probability; use StableDiffusion3DPO.forward(...) with diffusion_dpo_loss(...) instead"
        )
