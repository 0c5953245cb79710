"""Qwen-Image-Edit-Plus FlowGRPO rollout pipeline on diffusers: edited images plus the SDE window's log-probs.

:class:`QwenImageEditPlusPipelineWithLogProb` takes precomputed prompt embeddings and precomputed,
packed condition image latents ``(B, S_c, C)`` with their ``img_shapes``, and runs the Qwen-Image
rollout loop (:class:`~..qwen_image_flow_grpo.QwenImageRolloutMixin`) with
:class:`~.diffusers_training_adapter.QwenImageEditPlusFlowGRPO` as the training adapter: every step
builds its inputs with the trainer's own :func:`qwen_image_omni.pipelines.utils.prepare_model_inputs`
(target inputs + condition injection) and draws the transition with the adapter's
``sample_previous_step``, so rollout and trainer log-probs agree. The condition latents and
``img_shapes`` go to the trainer in ``metadata["rl"]`` under verl-omni's keys
(``condition_image_latents``, ``img_shapes``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .. import utils as pipeline_utils
from ..checks import check_int
from ..config import DiffusionModelConfig
from ..model_base import DiffusionModelBase, VllmOmniPipelineBase
from ..qwen_image_flow_grpo import QwenImagePipelineWithLogProb, QwenImageRolloutOutput
from ..qwen_image_flow_grpo.common import OUTPUT_TYPES, _check_rollout_scales
from .diffusers_training_adapter import (
    CONDITION_LATENTS_KEY,
    IMG_SHAPES_KEY,
    QwenImageEditPlusFlowGRPO,
    check_img_shapes,
)

__all__ = ["ARCHITECTURE", "QwenImageEditPlusPipelineWithLogProb"]

ARCHITECTURE = "QwenImageEditPlusPipeline"
"""The ``_class_name`` of Qwen-Image-Edit-Plus checkpoints (the registry key)."""


def _is_shape(value: Any) -> bool:
    """Whether ``value`` is one ``(frames, rows, cols)`` triple rather than a list of them."""
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) for v in value)


@VllmOmniPipelineBase.register(ARCHITECTURE, algorithm="flow_grpo")
class QwenImageEditPlusPipelineWithLogProb(QwenImagePipelineWithLogProb):
    """Rollout pipeline for Qwen-Image-Edit-Plus that records the SDE window's latents and log-probabilities.

    The diffusers rollout pipeline of Qwen-Image (:class:`QwenImagePipelineWithLogProb`: our
    transformer, :class:`FlowMatchSDEDiscreteScheduler`, optional VAE) with the condition image:
    the target noise is denoised with the condition tokens appended at every step, as diffusers'
    ``QwenImageEditPlusPipeline`` does, through the training adapter's step functions. Prompt
    embeddings and condition latents come precomputed (the Qwen2.5-VL prompt encoder and the VAE
    encode are the caller's).
    """

    training_adapter = QwenImageEditPlusFlowGRPO
    """The trainer-side adapter whose step functions the rollout runs."""

    _edit_condition: dict[str, Any] | None = None

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
            sde_window_range, sde_type, logprobs: as :meth:`QwenImagePipelineWithLogProb.forward`.

        Returns:
            QwenImageRolloutOutput: images, ``all_latents`` / ``all_log_probs`` / ``all_timesteps``
            of the target, the prompt embeddings, and ``rl = {"condition_image_latents", "img_shapes"}``.

        Raises:
            ValueError: no prompt embeddings or condition latents; condition latents or
                ``img_shapes`` that do not match the batch, the channels or the target size; and as
                :meth:`QwenImagePipelineWithLogProb.forward`.
            TypeError: an argument of the wrong type.
        """
        if prompt_embeds is None:
            raise ValueError(
                "`prompt_embeds` is required (Qwen-Image-Edit prompts are encoded with the image by the caller)"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent" and self.vae is None:
            raise ValueError(f"output_type={output_type!r} needs a `vae`; this pipeline has none (use 'latent')")
        _check_rollout_scales(true_cfg_scale, guidance_scale, noise_level, sde_type)
        repeats = check_int("`num_images_per_prompt`", num_images_per_prompt, 1)
        self._attention_kwargs = attention_kwargs or {}
        self._current_timestep = None
        self._interrupt = False

        prompt_embeds, prompt_embeds_mask = self.encode_prompt_ids(
            None, None, prompt_embeds, prompt_embeds_mask, repeats, max_sequence_length, name="prompt"
        )
        do_true_cfg = self._do_true_cfg(true_cfg_scale, None, negative_prompt_embeds)
        if do_true_cfg:
            negative_prompt_embeds, negative_prompt_embeds_mask = self.encode_prompt_ids(
                None, None, negative_prompt_embeds, negative_prompt_embeds_mask,
                repeats, max_sequence_length, name="negative_prompt",
            )  # fmt: skip
        else:
            negative_prompt_embeds = negative_prompt_embeds_mask = None
        batch_size = prompt_embeds.shape[0]
        condition_image_latents, img_shapes = self._condition_inputs(
            condition_image_latents, img_shapes, batch_size // repeats, repeats, prompt_embeds.device
        )
        height, width = self._target_size(img_shapes[0][0], height, width)

        self._edit_condition = {CONDITION_LATENTS_KEY: condition_image_latents, IMG_SHAPES_KEY: img_shapes}
        try:
            latents, all_latents, all_log_probs, all_timesteps, sde_windows = self.rollout(
                prompt_embeds,
                prompt_embeds_mask,
                negative_prompt_embeds,
                negative_prompt_embeds_mask,
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
        finally:
            self._edit_condition = None
        images = self._decode(latents, height, width, output_type)
        self.maybe_free_model_hooks()
        return QwenImageRolloutOutput(
            images=images,
            all_latents=all_latents,
            all_log_probs=all_log_probs,
            all_timesteps=all_timesteps,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_embeds_mask=negative_prompt_embeds_mask,
            sde_window=sde_windows[0],
            sde_windows=sde_windows,
            rl={CONDITION_LATENTS_KEY: condition_image_latents, IMG_SHAPES_KEY: img_shapes},
        )

    # -- condition ----------------------------------------------------------------------------------

    def _condition_inputs(
        self,
        condition_image_latents: Any,
        img_shapes: Any,
        num_prompts: int,
        repeats: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, list[list[tuple[int, int, int]]]]:
        """Condition latents ``(B, S_c, C)`` and per-sample ``img_shapes``, repeated per prompt and checked."""
        if condition_image_latents is None:
            raise ValueError(
                "`condition_image_latents` is required: packed (batch, tokens, channels) condition latents"
            )
        if not isinstance(condition_image_latents, torch.Tensor) or condition_image_latents.ndim != 3:
            got = (
                tuple(condition_image_latents.shape)
                if isinstance(condition_image_latents, torch.Tensor)
                else type(condition_image_latents).__name__
            )
            raise ValueError(f"`condition_image_latents` must be a packed (batch, tokens, channels) tensor, got {got}")
        in_channels = self.transformer.config.in_channels
        if condition_image_latents.shape[2] != in_channels:
            raise ValueError(
                f"`condition_image_latents` must have the transformer's in_channels={in_channels} channels, "
                f"got shape {tuple(condition_image_latents.shape)}"
            )
        if condition_image_latents.shape[0] == 1 and num_prompts > 1:
            condition_image_latents = condition_image_latents.expand(num_prompts, -1, -1)
        if condition_image_latents.shape[0] != num_prompts:
            raise ValueError(
                f"`condition_image_latents` must have 1 or one row per prompt ({num_prompts}), "
                f"got {condition_image_latents.shape[0]}"
            )
        condition_image_latents = condition_image_latents.to(device).repeat_interleave(repeats, dim=0)
        if img_shapes is None:
            raise ValueError(
                "`img_shapes` is required: [(1, rows, cols) of the target, *(1, rows, cols) per condition]"
            )
        if isinstance(img_shapes, (list, tuple)) and img_shapes and _is_shape(img_shapes[0]):
            img_shapes = [list(img_shapes)] * num_prompts
        if not isinstance(img_shapes, (list, tuple)) or len(img_shapes) != num_prompts:
            raise ValueError(
                f"`img_shapes` must be one [target, *condition] shape list, or one per prompt ({num_prompts}), "
                f"got {img_shapes!r}"
            )
        img_shapes = [sample for sample in img_shapes for _ in range(repeats)]
        target = img_shapes[0][0] if img_shapes[0] and _is_shape(tuple(img_shapes[0][0])) else None
        target_seq_len = target[0] * target[1] * target[2] if target is not None else -1
        img_shapes = check_img_shapes(
            img_shapes, condition_image_latents.shape[0], target_seq_len, condition_image_latents.shape[1]
        )
        if len({tuple(sample[0]) for sample in img_shapes}) != 1:
            raise ValueError(f"every sample of a batch must have one target shape, got `img_shapes` {img_shapes}")
        return condition_image_latents, img_shapes

    def _target_size(self, target: tuple[int, int, int], height: int | None, width: int | None) -> tuple[int, int]:
        """``(height, width)`` in pixels of the target shape; given sizes must agree with it."""
        frames, rows, cols = target
        if frames != 1:
            raise ValueError(f"the target shape of `img_shapes` must have 1 frame, got {target}")
        pixels = 2 * self.vae_scale_factor
        expected = (rows * pixels, cols * pixels)
        for name, given, value in (("height", height, expected[0]), ("width", width, expected[1])):
            if given is not None and given != value:
                raise ValueError(
                    f"`{name}`={given} does not match the target shape {target} of `img_shapes` ({value} pixels)"
                )
        return expected

    # -- the mixin's hooks: micro-batch, step config and step carry the condition ---------------------

    def _micro_batch(self, img_shapes: list) -> dict[str, Any]:
        """The trainer's micro-batch: image metadata plus ``condition_image_latents`` and the Edit ``img_shapes``.

        Raises:
            ValueError: no condition is set (the loop was entered other than through :meth:`forward`).
        """
        if self._edit_condition is None:
            raise ValueError(
                f"{type(self).__name__} rolls out through forward(..., condition_image_latents=..., img_shapes=...); "
                "no condition is set"
            )
        return {**super()._micro_batch(img_shapes), **self._edit_condition}

    def _step_config(
        self, img_shapes: list, num_steps: int, guidance: torch.Tensor | None, true_cfg_scale: float
    ) -> DiffusionModelConfig:
        """The trainer's config for this rollout, for the ``QwenImageEditPlusPipeline`` architecture."""
        config = super()._step_config(img_shapes, num_steps, guidance, true_cfg_scale)
        return dataclasses.replace(config, architecture=ARCHITECTURE)

    def _denoise_step(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor | None],
        negative_prompt: tuple[torch.Tensor | None, torch.Tensor | None],
        model_config: DiffusionModelConfig,
        micro_batch: dict[str, Any],
        noise_level: float | list[float],
        sde_type: str,
        generator: torch.Generator | list[torch.Generator] | None,
        return_logprobs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One rollout step through the trainer's functions; returns ``(prev_latents, log_prob)``.

        The inputs come from :func:`qwen_image_omni.pipelines.utils.prepare_model_inputs` (the
        trainer's call: target inputs, then the condition injected), the step from the adapter's
        ``sample_previous_step``; the prediction is the target tokens' only.

        Raises:
            ValueError: the registry's adapter for the step config is not ``training_adapter``.
        """
        adapter = self.training_adapter
        registered = DiffusionModelBase.get_class(model_config)
        if registered is not adapter:
            raise ValueError(
                f"the adapter registered for ({model_config.architecture!r}, {model_config.algorithm!r}) is "
                f"{registered.__name__}, not this pipeline's training_adapter {adapter.__name__}"
            )
        model_inputs, negative_model_inputs = pipeline_utils.prepare_model_inputs(
            module=self.transformer,
            model_config=model_config,
            latents=latents,
            timesteps=timestep,
            prompt_embeds=prompt[0],
            prompt_embeds_mask=prompt[1],
            negative_prompt_embeds=negative_prompt[0],
            negative_prompt_embeds_mask=negative_prompt[1],
            micro_batch=micro_batch,
            step=0,
        )
        attention_kwargs = getattr(self, "_attention_kwargs", None)
        if attention_kwargs:
            for inputs in (model_inputs, negative_model_inputs):
                if inputs is not None:
                    inputs["attention_kwargs"] = attention_kwargs
        prev_latents, log_prob, _, _, _ = adapter.sample_previous_step(
            self.transformer,
            self.scheduler,
            model_inputs,
            negative_model_inputs,
            sample=latents,
            timestep=timestep,
            true_cfg_scale=model_config.pipeline.true_cfg_scale,
            noise_level=noise_level,
            sde_type=sde_type,
            generator=generator,
            return_logprobs=return_logprobs,
            model_config=model_config,
        )
        return prev_latents, log_prob
