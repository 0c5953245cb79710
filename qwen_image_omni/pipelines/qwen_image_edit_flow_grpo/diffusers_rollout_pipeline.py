"""Qwen-Image-Edit-Plus FlowGRPO rollout pipeline on diffusers: edited images plus the SDE window's log-probs.

:class:`DiffusersQwenImageEditPlusPipelineWithLogProb` takes precomputed prompt embeddings and precomputed,
packed condition image latents ``(B, S_c, C)`` with their ``img_shapes``, and runs the Qwen-Image
rollout loop (:class:`~..qwen_image.rollout.QwenImageRolloutMixin`) with
:class:`~.diffusers_training_adapter.QwenImageEditPlusFlowGRPO` as the training adapter: every step
builds its inputs with the trainer's own :func:`qwen_image_omni.pipelines.utils.prepare_model_inputs`
(target inputs + condition injection) and draws the transition with the adapter's
``sample_previous_step``, so rollout and trainer log-probs agree. The condition latents and
``img_shapes`` go to the trainer in ``metadata["rl"]`` under verl-omni's keys
(``condition_image_latents``, ``img_shapes``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_int
from ..qwen_image_flow_grpo import DiffusersQwenImagePipelineWithLogProb, QwenImageRolloutOutput
from .diffusers_training_adapter import CONDITION_LATENTS_KEY, IMG_SHAPES_KEY
from .rollout import ARCHITECTURE, QwenImageEditRolloutMixin

__all__ = ["ARCHITECTURE", "DiffusersQwenImageEditPlusPipelineWithLogProb", "QwenImageEditPlusPipelineWithLogProb"]


class DiffusersQwenImageEditPlusPipelineWithLogProb(QwenImageEditRolloutMixin, DiffusersQwenImagePipelineWithLogProb):
    """Rollout pipeline for Qwen-Image-Edit-Plus that records the SDE window's latents and log-probabilities.

    The diffusers rollout pipeline of Qwen-Image (:class:`DiffusersQwenImagePipelineWithLogProb`: our
    transformer, :class:`FlowMatchSDEDiscreteScheduler`, optional VAE) with the condition image:
    the target noise is denoised with the condition tokens appended at every step, as diffusers'
    ``QwenImageEditPlusPipeline`` does, through the training adapter's step functions. Prompt
    embeddings and condition latents come precomputed (the Qwen2.5-VL prompt encoder and the VAE
    encode are the caller's). The condition handling is :class:`~.rollout.QwenImageEditRolloutMixin`'s,
    shared with the vllm-omni twin.
    """

    @torch.no_grad()
    def forward(
        self,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        *,
        condition_image_latents: torch.Tensor | None = None,
        img_shapes: list | None = None,
        true_cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        attention_kwargs: dict[str, Any] | None = None,
        max_sequence_length: int = 512,
        noise_level: float = 0.7,
        sde_window_size: int | None = None,
        sde_window_range: tuple[int, int] = (0, 5),
        sde_type: str = "sde",
        logprobs: bool = True,
    ) -> QwenImageRolloutOutput:
        """Edit with rollout data collection: denoise the target with the condition image's tokens appended.

        Args:
            prompt_embeds: ``(B, L, D)`` precomputed prompt embeddings (any padded width).
            prompt_embeds_mask: ``(B, L)`` their mask (all ones when None).
            negative_prompt_embeds: precomputed negative embeddings for true CFG (1 or B rows).
            negative_prompt_embeds_mask: their mask.
            condition_image_latents: ``(B or 1, S_c, C)`` packed, normalised VAE latents of the
                condition image(s) (diffusers' ``prepare_latents`` ``image_latents``), repeated
                ``num_images_per_prompt`` times per prompt like the embeddings.
            img_shapes: ``[(1, rows, cols) of the target, *(1, rows, cols) of each condition image]``
                for every prompt, or one such list shared by all prompts.
            true_cfg_scale: CFG scale; CFG runs when it is > 1 and negative embeddings are given.
            height: target height in pixels; default (and checked against) the target shape's rows.
            width: target width in pixels; default (and checked against) the target shape's cols.
            num_inference_steps, sigmas, guidance_scale, num_images_per_prompt, generator, latents,
            output_type, attention_kwargs, max_sequence_length, noise_level, sde_window_size,
            sde_window_range, sde_type, logprobs: as :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.

        Returns:
            QwenImageRolloutOutput: images, ``all_latents`` / ``all_log_probs`` / ``all_timesteps``
            of the target, the prompt embeddings, and ``rl = {"condition_image_latents", "img_shapes"}``.

        Raises:
            ValueError: no prompt embeddings or condition latents; condition latents or
                ``img_shapes`` that do not match the batch, the channels or the target size; and as
                :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.
            TypeError: an argument of the wrong type.
        """
        if prompt_embeds is None:
            raise ValueError(
                "`prompt_embeds` is required (Qwen-Image-Edit prompts are encoded with the image by the caller)"
            )
        self._begin_forward(output_type, attention_kwargs, true_cfg_scale, guidance_scale, noise_level, sde_type)
        repeats = check_int("`num_images_per_prompt`", num_images_per_prompt, 1)
        prompts = self._forward_prompts(
            (None, None, prompt_embeds, prompt_embeds_mask),
            (None, None, negative_prompt_embeds, negative_prompt_embeds_mask),
            true_cfg_scale, repeats, max_sequence_length,
        )  # fmt: skip
        result = self.edit_rollout(
            prompts,
            condition_image_latents=condition_image_latents,
            img_shapes=img_shapes,
            num_images_per_prompt=repeats,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            generator=generator,
            latents=latents,
            true_cfg_scale=true_cfg_scale,
            noise_level=noise_level,
            sde_window_size=sde_window_size,
            sde_window_range=sde_window_range,
            sde_type=sde_type,
            logprobs=logprobs,
        )
        latents, height, width = result["latents"], result["height"], result["width"]
        condition_image_latents, img_shapes = result[CONDITION_LATENTS_KEY], result[IMG_SHAPES_KEY]
        images = self._decode(latents, height, width, output_type)
        self.maybe_free_model_hooks()
        return QwenImageRolloutOutput(
            images=images,
            all_latents=result["all_latents"],
            all_log_probs=result["all_log_probs"],
            all_timesteps=result["all_timesteps"],
            **prompts.as_dict(),
            sde_window=result["sde_windows"][0],
            sde_windows=result["sde_windows"],
            rl={CONDITION_LATENTS_KEY: condition_image_latents, IMG_SHAPES_KEY: img_shapes},
        )


QwenImageEditPlusPipelineWithLogProb = DiffusersQwenImageEditPlusPipelineWithLogProb
"""The pipeline's former name, kept for the code and configs that name it. The vllm-omni rollout
pipeline carries it now (verl-omni's name); where vllm-omni is not installed, the rollout registry
answers this path for ``("QwenImageEditPlusPipeline", "flow_grpo")``."""
