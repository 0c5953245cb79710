"""Qwen-Image FlowGRPO rollout pipeline on vllm-omni (needs vllm-omni; imported by the integration).

:class:`QwenImagePipelineWithLogProb` is vllm-omni's ``QwenImagePipeline`` with our transformer
(:class:`qwen_image_omni.integrations.vllm_omni.QwenImagePipeline`) running the same
:class:`~.rollout.QwenImageRolloutMixin` loop as the diffusers rollout pipeline, so trainer log-probs
equal rollout log-probs. RL frameworks load it with ``load_format="custom_pipeline"`` and
``custom_pipeline_name=VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "flow_grpo")``.

Each request's ``DiffusionOutput`` follows verl-omni main's contract (:mod:`..rollout_output`):
``trajectory_*`` fields plus ``output = {"payload": {"image"}, "metadata": {"prompt_embeddings", "rl"}}``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm_omni.diffusion.data import DiffusionOutput, OmniDiffusionConfig
from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch

from ...integrations.vllm_omni import QwenImagePipeline
from ..model_base import VllmOmniPipelineBase
from ..request_batch import NEGATIVE_TOKEN_ID_KEYS, PROMPT_TOKEN_ID_KEYS, collate_token_ids
from ..rollout_output import per_request_rollouts
from .common import sde_scheduler
from .rollout import QwenImageRolloutMixin, QwenImageTokenIdPrompts

__all__ = ["ROLLOUT_OPTIONS", "QwenImagePipelineWithLogProb", "rollout_options"]


def rollout_options(defaults: dict[str, Any], extra_args: dict[str, Any] | None) -> dict[str, Any]:
    """``defaults`` overridden by the same keys of ``extra_args``."""
    extra_args = extra_args or {}
    return {name: extra_args.get(name, default) for name, default in defaults.items()}


ROLLOUT_OPTIONS: dict[str, Any] = {
    "noise_level": 0.7,
    "sde_window_size": None,
    "sde_window_range": (0, 5),
    "sde_type": "sde",
    "logprobs": True,
}
"""The rollout options read from ``sampling_params.extra_args``, with their defaults."""


@VllmOmniPipelineBase.register("QwenImagePipeline", algorithm="flow_grpo", replace=True)
class QwenImagePipelineWithLogProb(QwenImageRolloutMixin, QwenImageTokenIdPrompts, QwenImagePipeline):
    """FlowGRPO rollout on vllm-omni: images plus the SDE window's latents, log-probs and timesteps.

    Runs :class:`QwenImageRolloutMixin`'s loop, the trainer's own step functions, with
    :class:`~qwen_image_omni.pipelines.schedulers.flow_match_sde.FlowMatchSDEDiscreteScheduler`.
    Sampling parameters come from the request as in :class:`QwenImagePipeline`; the rollout options
    (:data:`ROLLOUT_OPTIONS`) from ``sampling_params.extra_args``. Each request's
    ``DiffusionOutput`` carries its rows of ``trajectory_latents`` ``(n, W + 1, S, C)``,
    ``trajectory_log_probs`` ``(n, W)`` (None without ``logprobs``) and ``trajectory_timesteps`` ``(n, W)``.
    """

    supports_request_batch = True  # verl-omni's flag: forward takes a packed DiffusionRequestBatch
    hands_engines_to_vllm_omni = False  # vllm-omni has no rollout pipeline with log-probs to hand over to

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        """vllm-omni's pipeline with our transformer and the SDE scheduler."""
        super().__init__(od_config=od_config, prefix=prefix)
        self.scheduler = sde_scheduler(self.scheduler)

    @classmethod
    def rollout_options(cls, extra_args: dict[str, Any] | None) -> dict[str, Any]:
        """:data:`ROLLOUT_OPTIONS` overridden by ``extra_args``; other keys there are ignored.

        Raises:
            ValueError: ``extra_args`` asks for a non-contiguous SDE window (``sde_contiguous=False``):
                a Qwen-Image trajectory is one contiguous window of consecutive states.
        """
        if not (extra_args or {}).get("sde_contiguous", True):
            raise ValueError(
                "sde_contiguous=False is not supported by the Qwen-Image rollout: its trajectory records one "
                "contiguous SDE window (all_latents are consecutive states); set algo.sde_contiguous=true"
            )
        return rollout_options(ROLLOUT_OPTIONS, extra_args)

    @torch.no_grad()
    def forward(self, req: DiffusionRequestBatch) -> list[DiffusionOutput]:
        """Roll out a request batch; one ``DiffusionOutput`` per request with its trajectory."""
        arguments = self.request_arguments(req)
        options = self.rollout_options(req.sampling_params_list[0].extra_args)
        self._attention_kwargs = {}
        self._current_timestep = None
        self._interrupt = False
        prompt_embeds, prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask = self.rollout_prompts(
            req, arguments
        )
        latents, all_latents, all_log_probs, all_timesteps, _ = self.rollout(
            prompt_embeds,
            prompt_embeds_mask,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            height=arguments["height"],
            width=arguments["width"],
            num_inference_steps=arguments["num_inference_steps"],
            sigmas=arguments["sigmas"],
            guidance_scale=arguments["guidance_scale"],
            generator=arguments["generator"],
            latents=arguments["latents"],
            true_cfg_scale=arguments["true_cfg_scale"],
            **options,
        )
        output_type = arguments["output_type"]
        images = self._decode_latents(latents, arguments["height"], arguments["width"], output_type).output
        prompt_embeddings = {
            "prompt_embeds": prompt_embeds,
            "prompt_embeds_mask": prompt_embeds_mask,
            "negative_prompt_embeds": negative_prompt_embeds,
            "negative_prompt_embeds_mask": negative_prompt_embeds_mask,
        }
        requests = per_request_rollouts(
            media=images,
            trajectory_latents=all_latents,
            trajectory_log_probs=all_log_probs,
            trajectory_timesteps=all_timesteps,
            prompt_embeddings=prompt_embeddings,
            rl=self.rollout_rl(latents=latents, arguments=arguments),
            num_requests=req.num_reqs,
            rows_per_request=arguments["num_images_per_prompt"],
        )
        return [DiffusionOutput(**request) for request in requests]

    def rollout_prompts(
        self, req: DiffusionRequestBatch, arguments: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The batch's prompt embeddings and masks (negatives ``None`` without true CFG).

        Requests carry templated token ids (verl-omni's ``prompt_token_ids`` / ``prompt_mask`` /
        ``negative_prompt_ids``: :meth:`encode_prompt_ids`), precomputed embeddings, or text
        (vllm-omni's ``encode_prompt``); the negative prompt is encoded only when
        ``true_cfg_scale > 1``.
        """
        per_prompt, max_length = arguments["num_images_per_prompt"], arguments["max_sequence_length"]
        device = self.text_encoder.device if self.text_encoder is not None else "cpu"
        token_ids, token_mask = collate_token_ids(req.prompts, PROMPT_TOKEN_ID_KEYS, device)
        negative_ids, negative_mask = collate_token_ids(req.prompts, NEGATIVE_TOKEN_ID_KEYS, device)
        use_cfg = arguments["true_cfg_scale"] > 1
        if token_ids is not None:
            embeds, mask = self.encode_prompt_ids(token_ids, token_mask, None, None, per_prompt, max_length, "prompt")
            if use_cfg and negative_ids is not None:
                negative = self.encode_prompt_ids(
                    negative_ids, negative_mask, None, None, per_prompt, max_length, "negative_prompt"
                )
                return embeds, mask, *negative
            return embeds, mask, None, None
        self.check_inputs(
            arguments["prompt"], arguments["height"], arguments["width"], arguments["negative_prompt"],
            arguments["prompt_embeds"], arguments["negative_prompt_embeds"], arguments["prompt_embeds_mask"],
            arguments["negative_prompt_embeds_mask"], None, max_length,
        )  # fmt: skip
        embeds, mask = self.encode_prompt(
            prompt=arguments["prompt"],
            prompt_embeds=arguments["prompt_embeds"],
            prompt_embeds_mask=arguments["prompt_embeds_mask"],
            num_images_per_prompt=per_prompt,
            max_sequence_length=max_length,
        )
        has_negative = arguments["negative_prompt"] is not None or arguments["negative_prompt_embeds"] is not None
        if not (has_negative and use_cfg):
            return embeds, mask, None, None
        negative = self.encode_prompt(
            prompt=arguments["negative_prompt"],
            prompt_embeds=arguments["negative_prompt_embeds"],
            prompt_embeds_mask=arguments["negative_prompt_embeds_mask"],
            num_images_per_prompt=per_prompt,
            max_sequence_length=max_length,
            prompt_name="negative_prompt",
        )
        return embeds, mask, *negative

    def rollout_rl(self, *, latents: torch.Tensor, arguments: dict[str, Any]) -> dict[str, Any] | None:
        """The algorithm's own tensors for ``metadata["rl"]`` (FlowGRPO: none); algorithms override it.

        Args:
            latents: ``(B, S, C)`` final packed latents of the batch.
            arguments: the batch's generation arguments (:meth:`request_arguments`).
        """
        return None
