"""vllm-omni's Qwen-Image pipelines with our transformer: what the plugin serves.

:func:`qwen_image_omni.integrations.vllm_omni.register` (the plugin entry point) points vllm-omni's
diffusion registry at the pipelines of this module for ``QwenImagePipeline``,
``QwenImageEditPipeline``, ``QwenImageEditPlusPipeline`` and ``QwenImageLayeredPipeline``
(:data:`PIPELINES`). Installing qwen-image-omni beside vllm-omni is all a user does.

Each pipeline is vllm-omni's own class with one change: ``self.transformer`` is our
:class:`~qwen_image_omni.QwenImageTransformer2DModel`, built from the checkpoint's transformer
config and loaded from the diffusers-named tensors vllm-omni streams in; no text length is computed
or passed:

- ``QwenImagePipeline``: ``forward`` (request batches), the CFG ``diffuse`` loop, and the step
  execution path (``prepare_encode`` → ``denoise_step``, continuous batching) are ours and carry no
  length;
- Edit, Edit-Plus and Layered keep vllm-omni's ``forward``, which still hands ``diffuse`` two
  width-derived length lists positionally; ``diffuse`` drops them before the transformer.

The RL rollout pipelines on vllm-omni subclass these; they live with their algorithms
(``qwen_image_omni/pipelines/<arch>_<algorithm>/vllm_omni_rollout_pipeline.py``), and nothing here
imports them: an engine loads one by its dotted path (``load_format="custom_pipeline"``,
``custom_pipeline_name=VllmOmniPipelineBase.get_pipeline_path(...)``).

Importing this module needs vllm-omni; the rest of the package imports without it.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, ClassVar

import torch

try:
    from vllm.logger import init_logger
    from vllm_omni.diffusion.data import DiffusionOutput, OmniDiffusionConfig
except ImportError as error:  # pragma: no cover - exercised only without vllm-omni
    raise ImportError(
        "qwen_image_omni.integrations.vllm_omni needs vllm-omni: pip install 'qwen-image-omni[vllm-omni]'"
    ) from error

from vllm_omni.diffusion.models.qwen_image import (
    pipeline_qwen_image,
    pipeline_qwen_image_edit,
    pipeline_qwen_image_edit_plus,
    pipeline_qwen_image_layered,
)
from vllm_omni.diffusion.utils.size_utils import normalize_min_aligned_size
from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch, split_diffusion_output_by_request

# vllm-omni looks the process functions up by name in the module a pipeline is registered from
# (``register_diffusion_model``), so this module re-exports those of vllm-omni's own modules.
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image import get_qwen_image_post_process_func
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image_edit import (
    get_qwen_image_edit_post_process_func,
    get_qwen_image_edit_pre_process_func,
)
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image_edit_plus import (
    get_qwen_image_edit_plus_post_process_func,
    get_qwen_image_edit_plus_pre_process_func,
)
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image_layered import (
    get_qwen_image_layered_pre_process_func,
)

from ...models import QwenImageTransformer2DModel
from .features import features_handed_to_vllm_omni
from .linear import diffusers_parameter_name, use_vllm_linear_layers
from .parallel import route_attention_through_vllm_omni, wants_vllm_omni_attention

logger = init_logger(f"vllm.{__name__}")  # as in .parallel: vllm's logging config applies

__all__ = [
    "PIPELINES",
    "TRANSFORMER_PREFIX",
    "QwenImageEditPipeline",
    "QwenImageEditPlusPipeline",
    "QwenImageLayeredPipeline",
    "QwenImageOmniMixin",
    "QwenImagePipeline",
    "build_transformer",
    "get_qwen_image_edit_plus_post_process_func",
    "get_qwen_image_edit_plus_pre_process_func",
    "get_qwen_image_edit_post_process_func",
    "get_qwen_image_edit_pre_process_func",
    "get_qwen_image_layered_pre_process_func",
    "get_qwen_image_post_process_func",
]

TRANSFORMER_PREFIX = "transformer."
"""Prefix of the transformer's tensors in the stream vllm-omni's loader feeds ``load_weights``."""


# --------------------------------------------------------------------------------------------------
# Our transformer inside vllm-omni's pipelines.
# --------------------------------------------------------------------------------------------------


def build_transformer(od_config: OmniDiffusionConfig, quant_config: Any = None) -> QwenImageTransformer2DModel:
    """Our transformer, configured from the checkpoint's ``transformer/config.json`` (``od_config.tf_model_config``).

    Parameters are created in the current default dtype and device (vllm-omni's loader sets them);
    the weights come later through the pipeline's ``load_weights``. Keys of the config that the
    model does not take (``_class_name``, ``pooled_projection_dim``, ...) are ignored, as diffusers'
    ``from_config`` does.

    Every ``nn.Linear`` is swapped for vllm's ``ReplicatedLinear``
    (:func:`~qwen_image_omni.integrations.vllm_omni.linear.use_vllm_linear_layers`): same state-dict
    keys and outputs, and vllm-omni's LoRA manager (static ``lora_path``, per-request ``LoRARequest``)
    can wrap them.

    When the engine names a diffusion attention backend or runs sequence parallel, the blocks
    attend through vllm-omni's ``Attention`` and the instance carries vllm-omni's ``_sp_plan``
    (:mod:`~qwen_image_omni.integrations.vllm_omni.parallel`).

    Raises:
        ValueError: a quantization config is set; our transformer runs unquantized weights only.
    """
    if quant_config is not None:
        raise ValueError(
            "qwen-image-omni's transformer does not support vllm-omni quantization; got quantization config "
            f"{type(quant_config).__name__}. Serve an unquantized checkpoint, or uninstall qwen-image-omni "
            "to use vllm-omni's own Qwen-Image transformer."
        )
    accepted = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    config = {key: value for key, value in od_config.tf_model_config.to_dict().items() if key in accepted}
    transformer = QwenImageTransformer2DModel(**config)
    use_vllm_linear_layers(transformer)
    if wants_vllm_omni_attention(od_config):  # at construction: vllm-omni's Attention reads the current config
        route_attention_through_vllm_omni(transformer, od_config)
    # vllm-omni's pipelines read these as plain attributes (diffusers only has them on `.config`).
    transformer.in_channels = transformer.config.in_channels
    transformer.guidance_embeds = transformer.config.guidance_embeds
    transformer.do_true_cfg = False
    return transformer


class _TransformerFactory:
    """Stands in for vllm-omni's transformer class while its pipeline constructor runs.

    vllm-omni's Qwen-Image constructors call ``QwenImageTransformer2DModel(od_config=..., quant_config=...,
    **config)`` by the name bound in their module; :func:`_constructing_with_our_transformer` binds
    that name to this factory for the duration of the call, so vllm-omni's transformer is never built.
    """

    def __new__(
        cls, *, od_config: OmniDiffusionConfig, quant_config: Any = None, **_: Any
    ) -> QwenImageTransformer2DModel:
        return build_transformer(od_config, quant_config)


_construction_lock = threading.Lock()


@contextmanager
def _constructing_with_our_transformer(module: ModuleType) -> Iterator[None]:
    """Bind ``module.QwenImageTransformer2DModel`` to :class:`_TransformerFactory` inside the block."""
    with _construction_lock:
        original = module.QwenImageTransformer2DModel
        module.QwenImageTransformer2DModel = _TransformerFactory
        try:
            yield
        finally:
            module.QwenImageTransformer2DModel = original


class QwenImageOmniMixin:
    """What every qwen-image-omni vllm-omni pipeline adds to vllm-omni's own class.

    Put it first among the bases: ``class P(QwenImageOmniMixin, <vllm-omni pipeline>)`` and set
    :attr:`vllm_omni_module` to the module that defines the vllm-omni pipeline.
    """

    vllm_omni_module: ClassVar[ModuleType]
    """The vllm-omni module whose constructor builds the transformer (its name is rebound while it runs)."""

    hands_engines_to_vllm_omni: ClassVar[bool] = True
    """An engine asking for a feature our transformer lacks gets vllm-omni's own pipeline (False: ValueError)."""

    def __new__(cls, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        """This class, or vllm-omni's own pipeline when the engine asks for a feature ours does not support.

        The hand-over is logged in one line naming the features and why
        (:mod:`qwen_image_omni.integrations.vllm_omni.features`); the engine then runs exactly as
        without our plugin.

        Raises:
            ValueError: the engine asks for such a feature and this pipeline has no vllm-omni
                counterpart to hand over to (the RL rollout pipelines).
        """
        handed = features_handed_to_vllm_omni(od_config)
        if not handed:
            return super().__new__(cls)
        reasons = "; ".join(f"{feature.name} ({feature.option}): {feature.why}" for feature in handed)
        if not cls.hands_engines_to_vllm_omni:
            raise ValueError(f"{cls.__name__} runs qwen-image-omni's transformer, which does not support {reasons}")
        own = cls.vllm_omni_pipeline()
        logger.warning(
            "qwen-image-omni: serving %s with vllm-omni's own transformer, as the engine asks for %s",
            own.__name__,
            reasons,
        )
        return own(od_config=od_config, prefix=prefix)

    @classmethod
    def vllm_omni_pipeline(cls) -> type:
        """vllm-omni's own pipeline class that this one extends."""
        return next(base for base in cls.__mro__ if base.__module__ == cls.vllm_omni_module.__name__)

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        """Build vllm-omni's pipeline with our transformer in place of vllm-omni's (logged once, at INFO)."""
        with _constructing_with_our_transformer(self.vllm_omni_module):
            super().__init__(od_config=od_config, prefix=prefix)
        cls = type(self)
        logger.info("qwen-image-omni: %s.%s serves %s", cls.__module__, cls.__qualname__, od_config.model)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy the diffusers-named ``transformer.*`` tensors into our transformer.

        Args:
            weights: ``(name, tensor)`` pairs as vllm-omni's loader streams them, each name prefixed
                with ``"transformer."`` and otherwise diffusers' state-dict key.

        The first call is the checkpoint load and must bring every transformer tensor. Later calls
        are weight updates (an RL trainer syncing each step, often in buckets) and may bring any subset.
        Names stay diffusers' once vllm-omni's LoRA manager has wrapped layers (a wrapped layer's
        ``to_q.base_layer.weight`` is loaded as ``to_q.weight``); LoRA adapters themselves are not
        touched.

        Returns:
            The names loaded, prefixed as given (vllm-omni checks them against ``named_parameters``).

        Raises:
            ValueError: a name the transformer does not have, a tensor whose shape differs from the
                parameter's, or (first call only) transformer tensors missing from ``weights``; the
                message names them.
        """
        targets = {diffusers_parameter_name(name): tensor for name, tensor in self.transformer.named_parameters()}
        targets.update((diffusers_parameter_name(name), tensor) for name, tensor in self.transformer.named_buffers())
        loaded: set[str] = set()
        for name, tensor in weights:
            key = name.removeprefix(TRANSFORMER_PREFIX)
            target = targets.get(key) if name.startswith(TRANSFORMER_PREFIX) else None
            if target is None:
                raise ValueError(
                    f"checkpoint tensor {name!r} has no counterpart in {type(self).__name__}: expected "
                    f"'{TRANSFORMER_PREFIX}<diffusers QwenImageTransformer2DModel key>'"
                )
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)} "
                    "(does transformer/config.json match the weights?)"
                )
            with torch.no_grad():
                target.copy_(tensor)
            loaded.add(name)
        first_load = not getattr(self, "_transformer_weights_loaded", False)
        expected = {
            TRANSFORMER_PREFIX + diffusers_parameter_name(name) for name, _ in self.transformer.named_parameters()
        }
        missing = sorted(expected - loaded)
        if missing and first_load:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing transformer tensors: {shown}")
        self._transformer_weights_loaded = True
        return loaded

    def _build_denoise_kwargs(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None,
        prompt_embeds: torch.Tensor,
        prompt_embeds_mask: torch.Tensor | None,
        img_shapes: list,
        do_true_cfg: bool,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds_mask: torch.Tensor | None,
        image_latents: torch.Tensor | None = None,
        extra_transformer_kwargs: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None, int | None]:
        """Transformer keyword arguments of one denoising step: ``(positive, negative or None, output_slice)``.

        vllm-omni's builder without its two text-length arguments. ``output_slice`` is the number
        of noise tokens to keep when image latents (Edit) are appended, else None.

        The latents go in as the transformer's dtype. vllm-omni's pipelines make them in the prompt
        embeddings' dtype, which is the transformer's only while the text encoder loads in the
        engine's dtype; a checkpoint whose text encoder config says float32 gives float32 prompts
        in a bfloat16 engine, which vllm-omni's own transformer refuses as well (``mat1 and mat2
        must have the same dtype``). Our transformer's own check stays strict for direct callers.
        """
        timestep = timestep.expand(latents.shape[0]).to(device=latents.device, dtype=latents.dtype) / 1000
        hidden_states = latents if image_latents is None else torch.cat([latents, image_latents], dim=1)
        hidden_states = hidden_states.to(self.transformer.dtype)
        common = {"hidden_states": hidden_states, "timestep": timestep, "guidance": guidance, "img_shapes": img_shapes}
        extra = extra_transformer_kwargs or {}
        positive = {
            **common,
            "encoder_hidden_states": prompt_embeds,
            "encoder_hidden_states_mask": prompt_embeds_mask,
            **extra,
        }
        negative = None
        if do_true_cfg:
            negative = {
                **common,
                "encoder_hidden_states": negative_prompt_embeds,
                "encoder_hidden_states_mask": negative_prompt_embeds_mask,
                **extra,
            }
        return positive, negative, None if image_latents is None else latents.shape[1]

    def diffuse(
        self,
        prompt_embeds: torch.Tensor,
        prompt_embeds_mask: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds_mask: torch.Tensor | None,
        latents: torch.Tensor,
        img_shapes: list,
        timesteps: torch.Tensor,
        do_true_cfg: bool,
        guidance: torch.Tensor | None,
        true_cfg_scale: float,
        image_latents: torch.Tensor | None = None,
        cfg_normalize: bool = True,
        additional_transformer_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The denoising loop with optional true CFG (vllm-omni's CFG-parallel aware steps), no text length.

        Args:
            prompt_embeds: ``(B, L, D)`` prompt embeddings, any padded width.
            prompt_embeds_mask: ``(B, L)`` their mask, or None.
            negative_prompt_embeds: ``(B, L', D)`` negative embeddings (CFG), or None.
            negative_prompt_embeds_mask: ``(B, L')`` their mask, or None.
            latents: ``(B, S, C)`` packed noise.
            img_shapes: per-sample image shapes for the transformer.
            timesteps: the scheduler's timesteps.
            do_true_cfg: run the negative branch and combine.
            guidance: guidance-distillation scale ``(B,)`` or None.
            true_cfg_scale: CFG scale.
            image_latents: conditioning image latents appended to the noise tokens (Edit), or None.
            cfg_normalize: rescale the CFG combination to the positive prediction's norm.
            additional_transformer_kwargs: extra transformer keyword arguments.

        Returns:
            The denoised packed latents.
        """
        self.scheduler.set_begin_index(0)
        self.transformer.do_true_cfg = do_true_cfg
        with self.progress_bar(total=len(timesteps)) as progress:
            for timestep in timesteps:
                if self.interrupt:
                    continue
                self._current_timestep = timestep
                positive, negative, output_slice = self._build_denoise_kwargs(
                    latents, timestep, guidance, prompt_embeds, prompt_embeds_mask, img_shapes, do_true_cfg,
                    negative_prompt_embeds, negative_prompt_embeds_mask, image_latents, additional_transformer_kwargs,
                )  # fmt: skip
                noise_pred = self.predict_noise_maybe_with_cfg(
                    do_true_cfg, true_cfg_scale, positive, negative, cfg_normalize, output_slice
                )
                latents = self.scheduler_step_maybe_with_cfg(noise_pred, timestep, latents, do_true_cfg)
                progress.update()
        return latents


class _VllmOmniForwardMixin:
    """For pipelines that keep vllm-omni's ``forward``, which passes ``diffuse`` two text-length
    lists (positions 7 and 8); they are dropped here, before anything reaches the transformer."""

    def diffuse(
        self,
        prompt_embeds: torch.Tensor,
        prompt_embeds_mask: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds_mask: torch.Tensor | None,
        latents: torch.Tensor,
        img_shapes: list,
        _lengths: Any,
        _negative_lengths: Any,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """:meth:`QwenImageOmniMixin.diffuse`, called with vllm-omni's argument layout."""
        return super().diffuse(
            prompt_embeds, prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask,
            latents, img_shapes, *args, **kwargs,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Pipelines.
# --------------------------------------------------------------------------------------------------


class QwenImagePipeline(QwenImageOmniMixin, pipeline_qwen_image.QwenImagePipeline):
    """vllm-omni's text-to-image Qwen-Image pipeline with our transformer and no text length anywhere.

    Request batches (``forward``), the CFG loop (``diffuse``) and step execution with continuous
    batching (``prepare_encode`` → ``denoise_step`` → ``step_scheduler``) are vllm-omni's contract;
    prompts of different lengths are right-padded to a common width and the transformer reads the
    width, so each request's output is what it would be alone.
    """

    vllm_omni_module = pipeline_qwen_image

    def _prepare_generation_context(self, **kwargs: Any) -> dict[str, Any]:
        """vllm-omni's preparation (inputs, prompts, latents, timesteps) without text lengths.

        vllm-omni's version also returns width-derived ``txt_seq_lens`` lists; they are set to
        None here so no request state carries one into step execution. The latents are made in the
        prompt embeddings' dtype there and are returned in the transformer's: the scheduler keeps
        the dtype of the prediction, so in step execution a request admitted later would otherwise
        hold latents of another dtype than those already stepped, which vllm-omni's runner cannot
        batch (``Mixed dtypes in latents batch``).
        """
        context = super()._prepare_generation_context(**kwargs)
        context["txt_seq_lens"] = context["negative_txt_seq_lens"] = None
        context["latents"] = context["latents"].to(self.transformer.dtype)
        return context

    def request_arguments(self, req: DiffusionRequestBatch) -> dict[str, Any]:
        """The generation arguments of a request batch, with vllm-omni's defaults.

        The first request's sampling parameters apply to the batch (vllm-omni batches only
        requests that share them); prompts, prompt embeddings, latents and generators are collated.
        """
        sampling = req.sampling_params_list[0]
        height = sampling.height or self.default_sample_size * self.vae_scale_factor
        width = sampling.width or self.default_sample_size * self.vae_scale_factor
        height, width = normalize_min_aligned_size(height, width, self.vae_scale_factor * 2)
        num_images_per_prompt = sampling.num_outputs_per_prompt if sampling.num_outputs_per_prompt > 0 else 1
        prompt, negative_prompt = self._extract_prompts(req.prompts)
        names = ("prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask")
        embeds = DiffusionRequestBatch.collate_prompt_field_map(req.prompts, dict.fromkeys(names))
        return {
            "prompt": None if embeds["prompt_embeds"] is not None else prompt,
            "negative_prompt": None if embeds["negative_prompt_embeds"] is not None else negative_prompt,
            **embeds,
            "height": height,
            "width": width,
            "num_inference_steps": sampling.num_inference_steps or 50,
            "sigmas": sampling.sigmas,
            "guidance_scale": sampling.guidance_scale if sampling.guidance_scale_provided else 1.0,
            "num_images_per_prompt": num_images_per_prompt,
            "generator": req.collate_request_generators(num_images_per_prompt, None),
            "true_cfg_scale": sampling.true_cfg_scale or 4.0,
            "max_sequence_length": sampling.max_sequence_length or self.tokenizer_max_length,
            "latents": req.collate_request_tensors("latents", None),
            "output_type": sampling.output_type or "pil",
        }

    def forward(self, req: DiffusionRequestBatch) -> list[DiffusionOutput]:
        """Generate the images of a request batch; one ``DiffusionOutput`` per request."""
        arguments = self.request_arguments(req)
        output_type = arguments.pop("output_type")
        context = self._prepare_generation_context(
            **arguments, attention_kwargs=None, callback_on_step_end_tensor_inputs=["latents"]
        )
        latents = self.diffuse(
            context["prompt_embeds"],
            context["prompt_embeds_mask"],
            context["negative_prompt_embeds"],
            context["negative_prompt_embeds_mask"],
            context["latents"],
            context["img_shapes"],
            context["timesteps"],
            context["do_true_cfg"],
            context["guidance"],
            arguments["true_cfg_scale"],
            cfg_normalize=True,
            additional_transformer_kwargs={"return_dict": False, "attention_kwargs": self.attention_kwargs},
        )
        self._current_timestep = None
        result = self._decode_latents(latents, arguments["height"], arguments["width"], output_type)
        return split_diffusion_output_by_request(result, req, num_outputs_per_prompt=arguments["num_images_per_prompt"])

    def denoise_step(self, input_batch: Any, **kwargs: Any) -> torch.Tensor | None:
        """One denoising step of a continuous batch (vllm-omni's ``InputBatch``), no text length."""
        del kwargs
        if self.interrupt:
            return None
        self._current_timestep = input_batch.timesteps
        self.transformer.do_true_cfg = input_batch.do_true_cfg
        positive, negative, output_slice = self._build_denoise_kwargs(
            input_batch.latents,
            input_batch.timesteps,
            input_batch.guidance,
            input_batch.prompt_embeds,
            input_batch.prompt_embeds_mask,
            input_batch.img_shapes,
            input_batch.do_true_cfg,
            input_batch.negative_prompt_embeds,
            input_batch.negative_prompt_embeds_mask,
            input_batch.image_latents,
            {"attention_kwargs": self.attention_kwargs, "return_dict": False},
        )
        return self.predict_noise_maybe_with_cfg(
            input_batch.do_true_cfg, input_batch.true_cfg_scale, positive, negative, input_batch.cfg_normalize,
            output_slice,
        )  # fmt: skip


class QwenImageEditPipeline(_VllmOmniForwardMixin, QwenImageOmniMixin, pipeline_qwen_image_edit.QwenImageEditPipeline):
    """vllm-omni's Qwen-Image-Edit pipeline with our transformer."""

    vllm_omni_module = pipeline_qwen_image_edit


class QwenImageEditPlusPipeline(
    _VllmOmniForwardMixin, QwenImageOmniMixin, pipeline_qwen_image_edit_plus.QwenImageEditPlusPipeline
):
    """vllm-omni's Qwen-Image-Edit-Plus (multi-image edit) pipeline with our transformer."""

    vllm_omni_module = pipeline_qwen_image_edit_plus


class QwenImageLayeredPipeline(
    _VllmOmniForwardMixin, QwenImageOmniMixin, pipeline_qwen_image_layered.QwenImageLayeredPipeline
):
    """vllm-omni's Qwen-Image-Layered pipeline with our transformer."""

    vllm_omni_module = pipeline_qwen_image_layered


# --------------------------------------------------------------------------------------------------
# What the plugin registers.
# --------------------------------------------------------------------------------------------------

PIPELINES: dict[str, dict[str, str | None]] = {
    "QwenImagePipeline": {"post_process_func_name": "get_qwen_image_post_process_func"},
    "QwenImageEditPipeline": {
        "pre_process_func_name": "get_qwen_image_edit_pre_process_func",
        "post_process_func_name": "get_qwen_image_edit_post_process_func",
    },
    "QwenImageEditPlusPipeline": {
        "pre_process_func_name": "get_qwen_image_edit_plus_pre_process_func",
        "post_process_func_name": "get_qwen_image_edit_plus_post_process_func",
    },
    "QwenImageLayeredPipeline": {"pre_process_func_name": "get_qwen_image_layered_pre_process_func"},
}
"""The architectures the plugin's ``register`` takes over (``model_index.json`` ``_class_name``), each with
the process functions vllm-omni's own module provides, re-exported here under the same names."""
