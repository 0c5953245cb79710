"""Qwen-Image FlowGRPO rollout pipeline on vllm-omni (needs vllm-omni; imported by the integration).

:class:`QwenImagePipelineWithLogProb` is vllm-omni's ``QwenImagePipeline`` with our transformer
(:class:`qwen_image_omni.integrations.vllm_omni.QwenImagePipeline`) running the same
:class:`~.rollout.QwenImageRolloutMixin` loop as the diffusers rollout pipeline, so trainer log-probs
equal rollout log-probs. RL frameworks load it with ``load_format="custom_pipeline"`` and
``custom_pipeline_name=VllmOmniPipelineBase.get_pipeline_path("QwenImagePipeline", "flow_grpo")``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm_omni.diffusion.data import DiffusionOutput, OmniDiffusionConfig
from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch

from ...integrations.vllm_omni import QwenImagePipeline
from ..model_base import VllmOmniPipelineBase
from .common import sde_scheduler
from .rollout import QwenImageRolloutMixin

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
class QwenImagePipelineWithLogProb(QwenImageRolloutMixin, QwenImagePipeline):
    """FlowGRPO rollout on vllm-omni: images plus the SDE window's latents, log-probs and timesteps.

    Runs :class:`QwenImageRolloutMixin`'s loop, the trainer's own step functions, with
    :class:`~qwen_image_omni.pipelines.schedulers.flow_match_sde.FlowMatchSDEDiscreteScheduler`.
    Sampling parameters come from the request as in :class:`QwenImagePipeline`; the rollout options
    (:data:`ROLLOUT_OPTIONS`) from ``sampling_params.extra_args``. Each request's
    ``DiffusionOutput`` carries its rows of ``trajectory_latents`` ``(n, W + 1, S, C)``,
    ``trajectory_log_probs`` ``(n, W)`` (None without ``logprobs``) and ``trajectory_timesteps`` ``(n, W)``.
    """

    hands_engines_to_vllm_omni = False  # vllm-omni has no rollout pipeline with log-probs to hand over to

    def __init__(self, *, od_config: OmniDiffusionConfig, prefix: str = ""):
        """vllm-omni's pipeline with our transformer and the SDE scheduler."""
        super().__init__(od_config=od_config, prefix=prefix)
        self.scheduler = sde_scheduler(self.scheduler)

    @classmethod
    def rollout_options(cls, extra_args: dict[str, Any] | None) -> dict[str, Any]:
        """:data:`ROLLOUT_OPTIONS` overridden by ``extra_args``; other keys there are ignored."""
        return rollout_options(ROLLOUT_OPTIONS, extra_args)

    @torch.no_grad()
    def forward(self, req: DiffusionRequestBatch) -> list[DiffusionOutput]:
        """Roll out a request batch; one ``DiffusionOutput`` per request with its trajectory."""
        arguments = self.request_arguments(req)
        options = self.rollout_options(req.sampling_params_list[0].extra_args)
        self.check_inputs(
            arguments["prompt"], arguments["height"], arguments["width"], arguments["negative_prompt"],
            arguments["prompt_embeds"], arguments["negative_prompt_embeds"], arguments["prompt_embeds_mask"],
            arguments["negative_prompt_embeds_mask"], None, arguments["max_sequence_length"],
        )  # fmt: skip
        self._attention_kwargs = {}
        self._current_timestep = None
        self._interrupt = False
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            prompt=arguments["prompt"],
            prompt_embeds=arguments["prompt_embeds"],
            prompt_embeds_mask=arguments["prompt_embeds_mask"],
            num_images_per_prompt=arguments["num_images_per_prompt"],
            max_sequence_length=arguments["max_sequence_length"],
        )
        has_negative = arguments["negative_prompt"] is not None or arguments["negative_prompt_embeds"] is not None
        negative_prompt_embeds = negative_prompt_embeds_mask = None
        if has_negative and arguments["true_cfg_scale"] > 1:
            negative_prompt_embeds, negative_prompt_embeds_mask = self.encode_prompt(
                prompt=arguments["negative_prompt"],
                prompt_embeds=arguments["negative_prompt_embeds"],
                prompt_embeds_mask=arguments["negative_prompt_embeds_mask"],
                num_images_per_prompt=arguments["num_images_per_prompt"],
                max_sequence_length=arguments["max_sequence_length"],
                prompt_name="negative_prompt",
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
        per_request = arguments["num_images_per_prompt"]
        outputs = []
        for index in range(req.num_reqs):
            rows = slice(index * per_request, (index + 1) * per_request)
            outputs.append(
                DiffusionOutput(
                    output=images[rows],
                    trajectory_latents=all_latents[rows],
                    trajectory_log_probs=None if all_log_probs is None else all_log_probs[rows],
                    trajectory_timesteps=all_timesteps[rows],
                )
            )
        return outputs
