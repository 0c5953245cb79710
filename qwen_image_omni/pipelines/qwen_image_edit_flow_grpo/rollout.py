"""The Qwen-Image-Edit-Plus rollout: the Qwen-Image rollout loop with the condition image, shared by both rollout pipelines.

:class:`QwenImageEditRolloutMixin` holds what the Edit rollout adds to
:class:`~..qwen_image.rollout.QwenImageRolloutMixin`: checking and repeating the packed
condition latents and their ``img_shapes`` (:meth:`~QwenImageEditRolloutMixin._condition_inputs`),
handed to the loop as the run's ``condition``, so that every step carries them to the trainer's own
input path (:func:`qwen_image_omni.pipelines.utils.adapter_model_inputs`, which the shared loop calls)
and :class:`~.diffusers_training_adapter.QwenImageEditPlusFlowGRPO`'s ``sample_previous_step``. The
diffusers rollout pipeline and its vllm-omni twin both run :meth:`~QwenImageEditRolloutMixin.edit_rollout`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..qwen_image import PromptBatch
from .diffusers_training_adapter import (
    CONDITION_LATENTS_KEY,
    IMG_SHAPES_KEY,
    QwenImageEditPlusFlowGRPO,
    check_img_shapes,
)

__all__ = ["ARCHITECTURE", "QwenImageEditRolloutMixin", "is_shape"]

ARCHITECTURE = "QwenImageEditPlusPipeline"
"""The ``_class_name`` of Qwen-Image-Edit-Plus checkpoints (the registry key)."""


def is_shape(value: Any) -> bool:
    """Whether ``value`` is one ``(frames, rows, cols)`` triple rather than a list of them."""
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) for v in value)


class QwenImageEditRolloutMixin:
    """Makes a Qwen-Image rollout pipeline (diffusers' or vllm-omni's) the Edit-Plus one: condition tokens appended.

    Put it before the host pipeline and :class:`~..qwen_image.rollout.QwenImageRolloutMixin`
    in the bases. The target noise is denoised with the condition tokens appended at every step, as
    diffusers' ``QwenImageEditPlusPipeline`` does, through the training adapter's step functions.
    The host provides ``transformer``, ``scheduler``, ``vae_scale_factor`` and the mixin loop.
    """

    training_adapter = QwenImageEditPlusFlowGRPO
    """The trainer-side adapter whose step functions the rollout runs."""

    algorithm = "flow_grpo"
    architecture = ARCHITECTURE

    def edit_rollout(
        self,
        prompts: PromptBatch,
        *,
        condition_image_latents: Any,
        img_shapes: Any,
        num_images_per_prompt: int,
        height: int | None,
        width: int | None,
        **rollout_kwargs: Any,
    ) -> dict[str, Any]:
        """Check and repeat the condition, then run the mixin's ``rollout`` with it appended at every step.

        Args:
            prompts: the encoded prompts, already repeated per image (``B`` = prompts x
                ``num_images_per_prompt``); a negative pair for true CFG.
            condition_image_latents: ``(prompts or 1, S_c, C)`` packed condition latents, not repeated.
            img_shapes: ``[target, *conditions]`` shapes, one list per prompt or one for all.
            num_images_per_prompt: repeats per prompt.
            height: target height in pixels; default (and checked against) the target shape.
            width: target width in pixels; default (and checked against) the target shape.
            **rollout_kwargs: the other arguments of ``QwenImageRolloutMixin.rollout``.

        Returns:
            ``{"latents", "all_latents", "all_log_probs", "all_timesteps", "sde_windows",
            "condition_image_latents", "img_shapes", "height", "width"}``, the condition repeated per image.

        Raises:
            ValueError: condition latents or ``img_shapes`` that do not match the batch, the
                channels or the target size; and as ``QwenImageRolloutMixin.rollout``.
        """
        run = self.start_edit_rollout(
            prompts,
            condition_image_latents=condition_image_latents,
            img_shapes=img_shapes,
            num_images_per_prompt=num_images_per_prompt,
            height=height,
            width=width,
            **rollout_kwargs,
        )
        self.run_rollout(run)
        all_latents, all_log_probs, all_timesteps = run.trajectory()
        return {
            "latents": run.latents,
            "all_latents": all_latents,
            "all_log_probs": all_log_probs,
            "all_timesteps": all_timesteps,
            "sde_windows": run.windows,
            **run.context["edit"],
        }

    def start_edit_rollout(
        self,
        prompts: PromptBatch,
        *,
        condition_image_latents: Any,
        img_shapes: Any,
        num_images_per_prompt: int,
        height: int | None,
        width: int | None,
        **rollout_kwargs: Any,
    ) -> Any:
        """Check and repeat the condition, then the mixin's ``start_rollout`` with it as the run's ``condition``.

        Arguments and errors as :meth:`edit_rollout`. The returned ``RolloutRun`` carries the condition
        in its micro-batch (every step appends it) and ``context["edit"]`` =
        ``{"condition_image_latents", "img_shapes", "height", "width"}``, the condition repeated per image.
        """
        batch_size = prompts.batch_size
        if batch_size % num_images_per_prompt:
            raise ValueError(
                f"`prompt_embeds` has {batch_size} rows, not a multiple of num_images_per_prompt={num_images_per_prompt}"
            )
        condition_image_latents, img_shapes = self._condition_inputs(
            condition_image_latents,
            img_shapes,
            batch_size // num_images_per_prompt,
            num_images_per_prompt,
            prompts.prompt_embeds.device,
        )
        height, width = self._target_size(img_shapes[0][0], height, width)
        run = self.start_rollout(
            prompts,
            height=height,
            width=width,
            condition={CONDITION_LATENTS_KEY: condition_image_latents, IMG_SHAPES_KEY: img_shapes},
            **rollout_kwargs,
        )
        run.context["edit"] = {
            CONDITION_LATENTS_KEY: condition_image_latents,
            IMG_SHAPES_KEY: img_shapes,
            "height": height,
            "width": width,
        }
        return run

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
        if isinstance(img_shapes, (list, tuple)) and img_shapes and is_shape(img_shapes[0]):
            img_shapes = [list(img_shapes)] * num_prompts
        if not isinstance(img_shapes, (list, tuple)) or len(img_shapes) != num_prompts:
            raise ValueError(
                f"`img_shapes` must be one [target, *condition] shape list, or one per prompt ({num_prompts}), "
                f"got {img_shapes!r}"
            )
        img_shapes = [sample for sample in img_shapes for _ in range(repeats)]
        target = img_shapes[0][0] if img_shapes[0] and is_shape(tuple(img_shapes[0][0])) else None
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
