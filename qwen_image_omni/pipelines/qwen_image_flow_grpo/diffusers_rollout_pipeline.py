"""Qwen-Image FlowGRPO rollout pipeline on diffusers: images plus the SDE window's log-probs.

Runs anywhere diffusers does; the vllm-omni twin is in :mod:`.vllm_omni_rollout_pipeline`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import QwenImagePipeline
from diffusers.models.modeling_utils import ModelMixin

from ...models import QwenImageTransformer2DModel
from ..qwen_image import (
    OUTPUT_TYPES,
    PromptBatch,
    QwenImageRolloutMixin,
    QwenImageRolloutOutput,
    QwenImageTokenIdPrompts,
    check_rollout_scales,
    sde_scheduler,
)
from ..schedulers.flow_match_sde import FlowMatchSDEDiscreteScheduler
from .diffusers_training_adapter import QwenImage

__all__ = ["DiffusersQwenImagePipelineWithLogProb", "QwenImagePipelineWithLogProb"]

logger = logging.getLogger(__name__)


class DiffusersQwenImagePipelineWithLogProb(QwenImageRolloutMixin, QwenImageTokenIdPrompts, QwenImagePipeline):
    """Rollout pipeline for Qwen-Image that records the SDE window's latents and log-probabilities.

    A diffusers ``QwenImagePipeline`` (so ``DiffusionPipeline``: ``register_modules``,
    ``from_pretrained``, ``to``) with :class:`FlowMatchSDEDiscreteScheduler` and our transformer;
    the text encoder, tokenizer and VAE are optional (precomputed embeddings in, latents out).
    Runs without vllm-omni; with vllm-omni installed, ``VllmOmniPipelineBase`` maps
    ``("QwenImagePipeline", "flow_grpo")`` to the vllm-omni twin in :mod:`.vllm_omni_rollout_pipeline`
    (:class:`~.vllm_omni_rollout_pipeline.QwenImagePipelineWithLogProb`), which runs the same
    :class:`QwenImageRolloutMixin` loop.
    """

    _optional_components = ["vae", "text_encoder", "tokenizer"]
    training_adapter = QwenImage
    algorithm = "flow_grpo"

    def __init__(
        self,
        transformer: QwenImageTransformer2DModel,
        scheduler: FlowMatchSDEDiscreteScheduler,
        vae: ModelMixin | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
    ):
        """Register the components; a plain flow-match Euler scheduler (a stock Qwen-Image
        ``scheduler/`` folder) is rebuilt as :class:`FlowMatchSDEDiscreteScheduler` from its config.

        Raises:
            TypeError: ``scheduler`` is neither a FlowMatchSDEDiscreteScheduler nor a
                FlowMatchEulerDiscreteScheduler.
        """
        scheduler = sde_scheduler(scheduler)
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )

    # -- end to end ---------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> QwenImageRolloutOutput:
        """Same as :meth:`forward`."""
        return self.forward(*args, **kwargs)

    @torch.no_grad()
    def forward(
        self,
        prompt_token_ids: torch.Tensor | list[int] | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt_ids: torch.Tensor | list[int] | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
        true_cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        attention_kwargs: dict[str, Any] | None = None,
        max_sequence_length: int = 512,
        noise_level: float = 0.7,
        sde_window_size: int | None = None,
        sde_window_range: tuple[int, int] = (0, 5),
        sde_type: str = "sde",
        logprobs: bool = True,
    ) -> QwenImageRolloutOutput:
        """End-to-end generation with rollout data collection.

        Encodes the prompt token ids (or takes ``prompt_embeds``), runs :meth:`rollout` (initial
        noise, :func:`set_qwen_image_timesteps`, the SDE window, :meth:`diffuse`) and decodes the
        final latents.

        Args:
            prompt_token_ids: ``(B, N)`` or ``(N,)`` token ids of the templated prompt (the first
                ``prompt_template_encode_start_idx`` encoded tokens are dropped, as in diffusers).
            prompt_mask: attention mask for ``prompt_token_ids`` (all ones when None).
            negative_prompt_ids: token ids of the negative prompt for true CFG.
            negative_prompt_mask: attention mask for ``negative_prompt_ids``.
            true_cfg_scale: CFG scale, a finite number >= 0; CFG runs when it is > 1 and a negative
                prompt is given.
            height: image height in pixels, a multiple of ``2 * vae_scale_factor`` (16; default
                ``default_sample_size * vae_scale_factor``).
            width: image width in pixels (same rule and default).
            num_inference_steps: number of denoising steps.
            sigmas: custom sigmas instead of ``linspace(1, 1/N, N)``.
            guidance_scale: distilled guidance scale, used only by ``guidance_embeds`` checkpoints.
            num_images_per_prompt: images per prompt (embeddings repeated per sample).
            generator: a random generator, or a list of one per sample; with a list each sample
                draws its own noise, SDE window and SDE noise from its generator (a batch gives what
                each sample would alone).
            latents: ``(B, S, C)`` initial packed noise; drawn when None.
            prompt_embeds: ``(B, L, D)`` precomputed prompt embeddings (any padded width).
            prompt_embeds_mask: ``(B, L)`` their mask (all ones when None).
            negative_prompt_embeds: precomputed negative embeddings.
            negative_prompt_embeds_mask: their mask.
            output_type: ``"latent"``, ``"pt"`` or ``"pil"`` (the last two need a VAE).
            attention_kwargs: passed to the transformer's attention (e.g. LoRA ``scale``).
            max_sequence_length: prompt embeddings are cut to this width.
            noise_level: SDE noise level inside the window.
            sde_window_size: number of SDE steps; None: every step but the last (:func:`full_sde_window`).
            sde_window_range: ``(low, high)`` envelope the window is drawn in, ``high <= num_inference_steps``
                (:func:`sample_sde_window`).
            sde_type: ``"sde"``, ``"cps"`` or ``"dance_sde"``.
            logprobs: compute per-step log-probabilities.

        Raises:
            ValueError, TypeError: as :meth:`rollout`, and for a bad ``output_type`` or prompt.

        Returns:
            QwenImageRolloutOutput: images plus ``all_latents``, ``all_log_probs``, ``all_timesteps``,
            the prompt embeddings and masks, and the SDE window.
        """
        self._begin_forward(output_type, attention_kwargs, true_cfg_scale, guidance_scale, noise_level, sde_type)
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        prompts = self._forward_prompts(
            (prompt_token_ids, prompt_mask, prompt_embeds, prompt_embeds_mask),
            (negative_prompt_ids, negative_prompt_mask, negative_prompt_embeds, negative_prompt_embeds_mask),
            true_cfg_scale, num_images_per_prompt, max_sequence_length,
        )  # fmt: skip
        latents, all_latents, all_log_probs, all_timesteps, sde_windows = self.rollout(
            prompts,
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
        images = self._decode(latents, height, width, output_type)
        self.maybe_free_model_hooks()
        return QwenImageRolloutOutput(
            images=images,
            all_latents=all_latents,
            all_log_probs=all_log_probs,
            all_timesteps=all_timesteps,
            **prompts.as_dict(),
            sde_window=sde_windows[0],
            sde_windows=sde_windows,
        )

    # -- what every rollout forward does first --------------------------------------------------------

    def _begin_forward(
        self,
        output_type: str,
        attention_kwargs: dict[str, Any] | None,
        true_cfg_scale: Any,
        guidance_scale: Any,
        noise_level: Any,
        sde_type: str,
    ) -> None:
        """Check the output type and the rollout's scales; reset the per-call state (attention kwargs, interrupt)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent" and self.vae is None:
            raise ValueError(f"output_type={output_type!r} needs a `vae`; this pipeline has none (use 'latent')")
        check_rollout_scales(true_cfg_scale, guidance_scale, noise_level, sde_type)
        self._attention_kwargs = attention_kwargs or {}
        self._current_timestep = None
        self._interrupt = False

    def _forward_prompts(
        self,
        positive: tuple[Any, Any, Any, Any],
        negative: tuple[Any, Any, Any, Any],
        true_cfg_scale: float,
        num_images_per_prompt: int,
        max_sequence_length: int,
    ) -> PromptBatch:
        """The forward's :class:`PromptBatch`, each side given as ``(token_ids, token_mask, embeds, embeds_mask)``.

        The negative side is encoded only when true CFG runs (:meth:`_do_true_cfg`).
        """
        repeats = (num_images_per_prompt, max_sequence_length)
        embeds = self.encode_prompt_ids(*positive, *repeats, name="prompt")
        if not self._do_true_cfg(true_cfg_scale, negative[0], negative[2]):
            return PromptBatch(*embeds)
        return PromptBatch(*embeds, *self.encode_prompt_ids(*negative, *repeats, name="negative_prompt"))

    @staticmethod
    def _do_true_cfg(true_cfg_scale: float, negative_prompt_ids: Any, negative_prompt_embeds: Any) -> bool:
        has_negative = negative_prompt_ids is not None or negative_prompt_embeds is not None
        if true_cfg_scale > 1 and not has_negative:
            logger.warning("true_cfg_scale=%s > 1 but no negative prompt is given: CFG is off", true_cfg_scale)
        elif true_cfg_scale <= 1 and has_negative:
            logger.warning("a negative prompt is given but true_cfg_scale=%s <= 1: CFG is off", true_cfg_scale)
        return true_cfg_scale > 1 and has_negative

    # -- images -------------------------------------------------------------------------------------

    def _decode(self, latents: torch.Tensor, height: int, width: int, output_type: str) -> Any:
        """Packed latents → images (diffusers' Qwen-Image VAE decode), or the latents for ``"latent"``."""
        if output_type == "latent":
            return latents
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor).to(self.vae.dtype)
        z_dim = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        image = self.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return self.image_processor.postprocess(image, output_type=output_type)


QwenImagePipelineWithLogProb = DiffusersQwenImagePipelineWithLogProb
"""The pipeline's former name, kept for the code and configs that name it. The vllm-omni rollout
pipeline carries it now (verl-omni's name); where vllm-omni is not installed, the rollout registry
answers this path for ``("QwenImagePipeline", "flow_grpo")``."""
