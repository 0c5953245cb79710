"""Qwen-Image Diffusion-DPO training adapter: scheduler, transformer inputs and the (true-CFG) prediction.

DPO trains on the forward (noising) process: the trainer noises the clean latents of a
(chosen, rejected) pair with shared noise and timestep, and regresses the transformer's velocity
on ``noise - latents`` against a frozen reference (:func:`diffusion_dpo_loss`). There is no reverse
step to score, so :meth:`QwenImageDPO.forward_and_sample_previous_step` only returns the prediction
(as verl-omni main's adapter does).

Inputs and prediction are FlowGRPO's (:class:`~..qwen_image_flow_grpo.QwenImage`): the same text
inputs, image shapes, guidance and true CFG, so a DPO rollout (which runs FlowGRPO's loop at noise
level 0) and the DPO trainer compute the same velocity.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..model_base import DiffusionModelBase
from ..qwen_image import (
    load_qwen_image_scheduler,
    module_dtype,
    set_pipeline_timesteps,
)
from ..qwen_image_flow_grpo.diffusers_training_adapter import QwenImage

if TYPE_CHECKING:
    from diffusers import ModelMixin

    from ..config import DiffusionModelConfig

__all__ = ["QwenImageDPO"]


@DiffusionModelBase.register("QwenImagePipeline", algorithm="dpo")
class QwenImageDPO(DiffusionModelBase):
    """Training adapter for Qwen-Image Diffusion-DPO (``("QwenImagePipeline", "dpo")``).

    A class of classmethods, never instantiated. One training step, for a micro-batch of
    preference pairs laid out row by row (rows ``2i`` / ``2i + 1`` chosen / rejected, sharing noise
    and timestep)::

        scheduler = QwenImageDPO.build_scheduler(config)          # the 1000-step training schedule
        noisy = scheduler.scale_noise(latents_clean, timesteps, noise)
        inputs, negative = QwenImageDPO.prepare_model_inputs(module, config, noisy, timesteps, prompt_embeds,
                                                             prompt_embeds_mask, None, None, micro_batch, 0)
        prediction = QwenImageDPO.forward(module, config, inputs, negative)
        loss, metrics = diffusion_dpo_loss(prediction, ref_prediction, noise - latents_clean, beta)
    """

    @classmethod
    def build_module(cls, model_config: DiffusionModelConfig, torch_dtype: torch.dtype) -> torch.nn.Module:
        """Our transformer for the trainer, as :meth:`QwenImage.build_module` builds it."""
        return QwenImage.build_module(model_config, torch_dtype)

    @classmethod
    def build_scheduler(cls, model_config: DiffusionModelConfig) -> FlowMatchEulerDiscreteScheduler:
        """Diffusers' flow-match Euler scheduler of the checkpoint, with its training schedule.

        Loads ``<local_path>/scheduler`` when that folder exists, else Qwen-Image's default config
        (:data:`~..qwen_image_flow_grpo.QWEN_IMAGE_SCHEDULER_CONFIG`). Its timesteps stay the
        ``num_train_timesteps`` ones the scheduler is built with: the DPO trainer draws training
        timesteps from them (``scheduler.timesteps[u * num_train_timesteps]``) and noises with
        ``scheduler.scale_noise``. :meth:`set_timesteps` switches to the inference schedule.
        """
        return load_qwen_image_scheduler(FlowMatchEulerDiscreteScheduler, getattr(model_config, "local_path", None))

    @classmethod
    def set_timesteps(
        cls, scheduler: FlowMatchEulerDiscreteScheduler, model_config: DiffusionModelConfig, device: str | torch.device
    ) -> None:
        """Set Qwen-Image's inference schedule of ``pipeline.num_inference_steps`` steps on ``scheduler``.

        The schedule of diffusers' ``QwenImagePipeline`` and of the rollout: sigmas
        ``linspace(1, 1/N, N)`` with the dynamic shift of the ``pipeline.height`` x ``pipeline.width``
        latent size. (verl-omni's adapter calls ``scheduler.set_timesteps(N)`` without the shift,
        which diffusers refuses for Qwen-Image's ``use_dynamic_shifting`` scheduler.)

        Args:
            scheduler: the scheduler to configure.
            model_config: provides ``pipeline.height``, ``pipeline.width`` and ``pipeline.num_inference_steps``.
            device: where the timesteps and sigmas go.
        """
        set_pipeline_timesteps(scheduler, model_config.pipeline, device)

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
        """Build the transformer keyword arguments for already-noised latents (and the negative prompt's).

        Args:
            module: the Qwen-Image transformer (its dtype is applied to the float inputs).
            model_config: provides ``pipeline.true_cfg_scale`` (negative inputs only when ``> 1``),
                ``pipeline.height`` / ``width`` (unless the micro-batch has them) and
                ``pipeline.guidance_scale`` (guidance-distilled checkpoints only).
            latents: ``(B, S, C)`` noised packed latents x_t.
            timesteps: ``(B,)`` timesteps on the scheduler's 0..1000 scale (or one scalar for the batch).
            prompt_embeds: ``(B, L, D)`` positive prompt embeddings, any padded width.
            prompt_embeds_mask: ``(B, L)`` their mask (1 = valid token); required.
            negative_prompt_embeds: ``(B, L', D)`` negative prompt embeddings; required when
                ``pipeline.true_cfg_scale > 1``, ignored otherwise.
            negative_prompt_embeds_mask: ``(B, L')`` their mask; required with them.
            micro_batch: mapping with optional ``height``, ``width`` and ``vae_scale_factor``.
            step: unused (DPO has no trajectory to index); accepted for the interface.

        Returns:
            ``(model_inputs, negative_model_inputs)``; the second is None when true CFG is off.

        Raises:
            ValueError: ``prompt_embeds_mask`` is None; true CFG is on and a negative input is
                missing; latents that are not ``(B, S, C)``, timesteps that are not ``(B,)``, or
                shapes that do not fit each other or the image size.
        """
        del step
        if prompt_embeds_mask is None:
            raise ValueError(
                "`prompt_embeds_mask` is required for Qwen-Image DPO (the rollout records it with the "
                "prompt embeddings), got None"
            )
        if not isinstance(latents, torch.Tensor) or latents.ndim != 3:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"`latents` must be the (batch, image tokens, channels) noised latents, got {shape}")
        timesteps = cls._batch_timesteps(timesteps, latents.shape[0])
        dtype = module_dtype(module)
        hidden_states = latents if dtype is None else latents.to(dtype)
        common = {
            "hidden_states": hidden_states,
            "timestep": timesteps / 1000.0,
            "guidance": QwenImage._guidance(module, model_config, hidden_states),
            "img_shapes": QwenImage._img_shapes(model_config, micro_batch, hidden_states),
            "return_dict": False,
        }
        model_inputs = {**common, **cls._prompt_inputs(prompt_embeds, prompt_embeds_mask, dtype, latents, "prompt")}
        true_cfg_scale = model_config.pipeline.true_cfg_scale
        if true_cfg_scale <= 1.0:
            return model_inputs, None
        missing = [
            name
            for name, value in (
                ("negative_prompt_embeds", negative_prompt_embeds),
                ("negative_prompt_embeds_mask", negative_prompt_embeds_mask),
            )
            if value is None
        ]
        if missing:
            raise ValueError(f"pipeline.true_cfg_scale={true_cfg_scale} > 1 turns on true CFG, which needs {missing}")
        negative = cls._prompt_inputs(
            negative_prompt_embeds, negative_prompt_embeds_mask, dtype, latents, "negative_prompt"
        )
        return model_inputs, {**common, **negative}

    @classmethod
    def forward(
        cls,
        module: ModelMixin,
        model_config: DiffusionModelConfig,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The velocity prediction ``(B, S, C)``, with true CFG when ``pipeline.true_cfg_scale > 1``.

        FlowGRPO's :meth:`QwenImage.predict_noise` (one transformer forward per prompt, then
        :func:`~..qwen_image_flow_grpo.apply_true_cfg`), the function the rollout's steps run.

        Raises:
            ValueError: true CFG is on and ``negative_model_inputs`` is None.
        """
        true_cfg_scale = model_config.pipeline.true_cfg_scale
        return QwenImage.predict_noise(module, model_inputs, negative_model_inputs, true_cfg_scale, model_config)

    @classmethod
    def forward_and_sample_previous_step(
        cls,
        module: ModelMixin,
        scheduler: FlowMatchEulerDiscreteScheduler,
        model_config: DiffusionModelConfig,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None,
        scheduler_inputs: Mapping[str, torch.Tensor] | None,
        step: int,
    ) -> torch.Tensor:
        """The prediction of :meth:`forward`: DPO has no reverse step to sample or score.

        Returns the ``(B, S, C)`` velocity, not FlowGRPO's tuple, as verl-omni main's adapter does;
        ``scheduler``, ``scheduler_inputs`` and ``step`` are unused.
        """
        del scheduler, scheduler_inputs, step
        return cls.forward(module, model_config, model_inputs, negative_model_inputs)

    # -- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _batch_timesteps(timesteps: Any, batch_size: int) -> torch.Tensor:
        """``(B,)`` timesteps from a ``(B,)`` tensor or a 0-d one for the whole batch."""
        if not isinstance(timesteps, torch.Tensor):
            raise TypeError(f"`timesteps` must be a torch.Tensor, got {type(timesteps).__name__}")
        if timesteps.ndim == 0:
            return timesteps.expand(batch_size)
        if timesteps.ndim != 1 or timesteps.shape[0] != batch_size:
            raise ValueError(
                f"`timesteps` must have shape ({batch_size},), one per latent (or be a scalar), "
                f"got {tuple(timesteps.shape)}"
            )
        return timesteps

    @staticmethod
    def _prompt_inputs(
        embeds: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None, latents: torch.Tensor, name: str
    ) -> dict[str, Any]:
        """FlowGRPO's text inputs, after checking that the prompt has one row per latent."""
        inputs = QwenImage._text_inputs(embeds, mask, dtype, f"{name}_embeds")
        if embeds.shape[0] != latents.shape[0]:
            raise ValueError(
                f"`{name}_embeds` must have batch size {latents.shape[0]} (that of latents), got {tuple(embeds.shape)}"
            )
        return inputs
