"""Qwen-Image-Edit-Plus FlowGRPO training adapter: Qwen-Image's step functions plus the condition image.

:class:`QwenImageEditPlusFlowGRPO` builds the target's transformer inputs exactly as the text-to-image
:class:`~..qwen_image_flow_grpo.QwenImage` does, then (through
:func:`qwen_image_omni.pipelines.utils.prepare_model_inputs`) reads the condition latents the rollout
recorded (``condition_image_latents``, packed ``(B, S_c, C)``) with their per-sample ``img_shapes``
(target first, then the condition images) and appends them after the target tokens, as diffusers'
``QwenImageEditPlusPipeline`` does. The prediction is sliced back to the target tokens
(:meth:`DiffusionI2IModelBase.forward`), so the inherited reverse-SDE step works on the target latents.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..model_base import TARGET_SEQ_LEN_KEY, DiffusionI2IModelBase, DiffusionModelBase
from ..qwen_image_flow_grpo import QwenImage

__all__ = ["CONDITION_LATENTS_KEY", "IMG_SHAPES_KEY", "SP_SIZE_KEY", "QwenImageEditPlusFlowGRPO", "check_img_shapes"]

CONDITION_LATENTS_KEY = "condition_image_latents"
"""Micro-batch / ``metadata["rl"]`` key of the packed condition latents (verl-omni's name)."""

IMG_SHAPES_KEY = "img_shapes"
"""Micro-batch / ``metadata["rl"]`` key of the per-sample ``[target, *condition]`` image shapes."""

SP_SIZE_KEY = "sp_size"
"""Micro-batch key of the Ulysses sequence-parallel size (optional)."""


def _unwrap(value: Any) -> Any:
    """A TensorDict non-tensor entry as plain Python (``NonTensorStack`` → list, ``NonTensorData`` → its data)."""
    name = type(value).__name__
    if name.startswith("NonTensorStack"):
        return value.tolist()
    if name.startswith("NonTensorData"):
        return value.data
    return value


def _get(micro_batch: Any, key: str) -> Any:
    """``micro_batch[key]`` unwrapped, or None when the key is missing (dict or TensorDict)."""
    if micro_batch is None or key not in micro_batch.keys():
        return None
    return _unwrap(micro_batch.get(key))


def _as_shape(shape: Any, index: int) -> tuple[int, int, int]:
    """One ``(frames, rows, cols)`` entry of ``img_shapes[index]`` as a tuple of positive Python ints."""
    values = shape.tolist() if isinstance(shape, torch.Tensor) else shape
    if isinstance(values, (list, tuple)) and len(values) == 3:
        values = tuple(int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v for v in values)
        if all(isinstance(v, int) and v > 0 for v in values):
            return values
    raise ValueError(f"`img_shapes[{index}]` entries must be (frames, rows, cols) positive ints, got {shape!r}")


def check_img_shapes(
    img_shapes: Any, batch_size: int, target_seq_len: int, condition_seq_len: int
) -> list[list[tuple[int, int, int]]]:
    """Validate per-sample Edit ``img_shapes`` and return them as lists of int triples.

    Each sample's entry is ``[(frames, rows, cols) of the target, *(frames, rows, cols) of each
    condition image]``: the target's tokens must be ``target_seq_len`` and the condition images'
    together ``condition_seq_len``.

    Raises:
        ValueError: not one entry per sample, an entry with no condition image, a shape that is not
            three positive ints, or token counts that do not match the latents.
    """
    if not isinstance(img_shapes, (list, tuple)) or len(img_shapes) != batch_size:
        got = f"{len(img_shapes)} entries" if isinstance(img_shapes, (list, tuple)) else type(img_shapes).__name__
        raise ValueError(
            f"`img_shapes` must hold one [target, *condition] shape list per sample ({batch_size}), got {got}"
        )
    checked = []
    for index, sample in enumerate(img_shapes):
        sample = _unwrap(sample)
        if not isinstance(sample, (list, tuple)) or len(sample) < 2:
            raise ValueError(
                f"`img_shapes[{index}]` must be [target shape, condition shape, ...] (at least 2 shapes), got {sample!r}"
            )
        shapes = [_as_shape(shape, index) for shape in sample]
        target = shapes[0][0] * shapes[0][1] * shapes[0][2]
        condition = sum(f * h * w for f, h, w in shapes[1:])
        if target != target_seq_len or condition != condition_seq_len:
            raise ValueError(
                f"`img_shapes[{index}]` {shapes} gives {target} target + {condition} condition tokens, but the latents "
                f"have {target_seq_len} target + {condition_seq_len} condition tokens"
            )
        checked.append(shapes)
    return checked


@DiffusionModelBase.register("QwenImageEditPlusPipeline", algorithm="flow_grpo")
class QwenImageEditPlusFlowGRPO(DiffusionI2IModelBase, QwenImage):
    """Training adapter for Qwen-Image-Edit-Plus image editing (FlowGRPO).

    Scheduler, timesteps (from the target size), target inputs and the reverse-SDE step are
    :class:`QwenImage`'s. :meth:`prepare_condition` reads ``condition_image_latents``,
    ``img_shapes`` and ``sp_size`` from the micro-batch; :meth:`inject_condition` appends the
    condition tokens after the target's and replaces ``img_shapes`` with the condition-aware ones;
    the inherited :meth:`forward` keeps the target tokens of the prediction. A class of
    classmethods, never instantiated.
    """

    @classmethod
    def prepare_processor_files(cls, model_path: str) -> str:
        """Write ``processor/config.json`` (``{"model_type": "qwen2_vl"}``) when the checkpoint lacks it.

        Qwen-Image-Edit checkpoints ship a ``processor`` folder without ``config.json``, which
        ``transformers``' ``AutoProcessor`` needs. An existing file is left as it is.

        Returns:
            The processor folder.

        Raises:
            FileNotFoundError: ``<model_path>/processor`` is not a folder.
        """
        processor_dir = Path(model_path) / "processor"
        if not processor_dir.is_dir():
            raise FileNotFoundError(f"Qwen-Image-Edit processor folder not found: {processor_dir}")
        config_path = processor_dir / "config.json"
        if not config_path.is_file():
            config_path.write_text(json.dumps({"model_type": "qwen2_vl"}), encoding="utf-8")
        return str(processor_dir)

    @classmethod
    def prepare_condition(cls, micro_batch: Mapping[str, Any], latents: torch.Tensor, step: int) -> dict | None:
        """The condition of ``micro_batch``: ``{"image_latents", "img_shapes", "sp_size"}``, or None.

        Args:
            micro_batch: a dict or TensorDict holding ``condition_image_latents`` ``(B, S_c, C)``,
                ``img_shapes`` (per sample ``[target, *condition]``) and optionally ``sp_size``.
            latents: the trajectory (unused; the condition is the same at every step).
            step: the step index (unused).

        Returns:
            None when there is no ``condition_image_latents`` (the dispatcher then raises).

        Raises:
            ValueError: the micro-batch has ``image_latents`` instead of ``condition_image_latents``
                (a rollout that wrote the wrong key; ``image_latents`` is the FLOPs counter's).
        """
        del latents, step
        image_latents = _get(micro_batch, CONDITION_LATENTS_KEY)
        if image_latents is None:
            if micro_batch is not None and "image_latents" in micro_batch.keys():
                raise ValueError(
                    f"{cls.__name__}.prepare_condition: the micro-batch has 'image_latents' but not "
                    f"'{CONDITION_LATENTS_KEY}'; the rollout wrote the wrong key. Record the condition latents "
                    f"under '{CONDITION_LATENTS_KEY}' in the rollout's rl metadata ('image_latents' is read by the "
                    "FLOPs counter as the denoised latent)"
                )
            return None
        return {
            "image_latents": image_latents,
            "img_shapes": _get(micro_batch, IMG_SHAPES_KEY),
            "sp_size": _get(micro_batch, SP_SIZE_KEY),
        }

    @classmethod
    def inject_condition(
        cls,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None,
        condition: Mapping[str, Any] | None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Append the condition tokens (the base's concatenation) and set the condition-aware ``img_shapes``.

        An empty or None condition changes nothing.

        Raises:
            ValueError: as :meth:`DiffusionI2IModelBase.inject_condition`; a condition without
                ``img_shapes`` or whose ``img_shapes`` do not match the target and condition token
                counts (:func:`check_img_shapes`); target + condition tokens not divisible by an
                ``sp_size`` > 1.
        """
        if not condition:
            return model_inputs, negative_model_inputs
        # The base checks the condition latents against hidden_states and concatenates them.
        model_inputs, negative_model_inputs = super().inject_condition(model_inputs, negative_model_inputs, condition)
        target_seq_len = model_inputs[TARGET_SEQ_LEN_KEY]
        condition_seq_len = condition["image_latents"].shape[1]
        sp_size = condition.get("sp_size")
        if isinstance(sp_size, int) and sp_size > 1 and (target_seq_len + condition_seq_len) % sp_size:
            raise ValueError(
                "Qwen-Image-Edit target and condition tokens must together be divisible by the sequence-parallel "
                f"size: ({target_seq_len} + {condition_seq_len}) % sp_size={sp_size} != 0"
            )
        img_shapes = condition.get("img_shapes")
        if img_shapes is None:
            raise ValueError(
                f"the condition needs '{IMG_SHAPES_KEY}' (per sample [target, *condition] shapes) for the "
                "condition tokens' RoPE positions; the rollout records them next to the condition latents"
            )
        batch_size = model_inputs["hidden_states"].shape[0]
        img_shapes = check_img_shapes(img_shapes, batch_size, target_seq_len, condition_seq_len)
        for inputs in (model_inputs, negative_model_inputs):
            if inputs is not None:
                inputs["img_shapes"] = img_shapes
        return model_inputs, negative_model_inputs
