"""Qwen-Image Dual-GRPO rollout pipeline on diffusers: FlowGRPO's image rollout plus a sampled text response.

Runs anywhere diffusers does; the vllm-omni twin is in :mod:`.vllm_omni_rollout_pipeline`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..qwen_image import QwenImageRolloutOutput
from ..qwen_image_flow_grpo.diffusers_rollout_pipeline import DiffusersQwenImagePipelineWithLogProb
from .diffusers_training_adapter import QwenImageDualGRPO
from .text_sampling import TEXT_SAMPLING_OPTIONS, QwenImageTextSamplingMixin, text_sampling_options

__all__ = ["DiffusersQwenImagePipelineWithDualLogProb", "QwenImagePipelineWithDualLogProb"]


class DiffusersQwenImagePipelineWithDualLogProb(QwenImageTextSamplingMixin, DiffusersQwenImagePipelineWithLogProb):
    """Rollout pipeline for Qwen-Image Dual-GRPO: :class:`DiffusersQwenImagePipelineWithLogProb` plus text.

    The image side is FlowGRPO's rollout unchanged (the prompt's own embeddings, the SDE window's
    latents and log-probs); after it, :meth:`sample_text_responses` samples one response per image
    from the text encoder on the same prompt token ids, recorded in the output's ``rl``
    (``llm_response_ids``, ``llm_all_log_probs``, ``text_encoder_responses``, ``llm_response_mask``).
    Needs the text encoder and the tokenizer. With vllm-omni installed, ``VllmOmniPipelineBase``
    maps ``("QwenImagePipeline", "dual_grpo")`` to the vllm-omni twin, which samples the same way.
    """

    training_adapter = QwenImageDualGRPO
    algorithm = "dual_grpo"

    @torch.no_grad()
    def forward(
        self,
        prompt_token_ids: torch.Tensor | list[int] | None = None,
        prompt_mask: torch.Tensor | None = None,
        *args: Any,
        max_new_tokens: int = TEXT_SAMPLING_OPTIONS["max_new_tokens"],
        llm_logprobs: bool = TEXT_SAMPLING_OPTIONS["llm_logprobs"],
        temperature: float = TEXT_SAMPLING_OPTIONS["temperature"],
        top_p: float = TEXT_SAMPLING_OPTIONS["top_p"],
        top_k: int = TEXT_SAMPLING_OPTIONS["top_k"],
        repetition_penalty: float = TEXT_SAMPLING_OPTIONS["repetition_penalty"],
        **kwargs: Any,
    ) -> QwenImageRolloutOutput:
        """Image rollout, then text sampling; arguments as the FlowGRPO pipeline's ``forward`` plus text.

        Args:
            prompt_token_ids: ``(B, N)`` / ``(N,)`` templated prompt token ids; required (the text
                encoder generates from them).
            prompt_mask: their mask (any padding layout).
            *args: passed on to :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.
            max_new_tokens, llm_logprobs, temperature, top_p, top_k, repetition_penalty: the text
                options (:data:`~.text_sampling.TEXT_SAMPLING_OPTIONS`).
            **kwargs: passed on to :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.

        Returns:
            QwenImageRolloutOutput: FlowGRPO's output with ``rl`` holding the text responses, one per image.

        Raises:
            ValueError: no ``prompt_token_ids``; as :meth:`sample_text_responses` and
                :meth:`DiffusersQwenImagePipelineWithLogProb.forward`.
            TypeError: as those two.
        """
        if prompt_token_ids is None:
            raise ValueError(
                "Dual-GRPO samples text from the prompt: `prompt_token_ids` are required, got None "
                "(prompt embeddings alone carry no tokens to generate from)"
            )
        # Checked before the image rollout runs.
        text_options = text_sampling_options(
            {"max_new_tokens": max_new_tokens, "llm_logprobs": llm_logprobs, "temperature": temperature,
             "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty}
        )  # fmt: skip
        output = super().forward(prompt_token_ids, prompt_mask, *args, **kwargs)
        prompts = torch.as_tensor(prompt_token_ids)
        num_prompts = 1 if prompts.ndim == 1 else prompts.shape[0]
        rl = self.sample_text_responses(
            prompt_token_ids,
            prompt_mask,
            num_responses_per_prompt=output.all_latents.shape[0] // num_prompts,
            **text_options,
        )
        return dataclasses.replace(output, rl=rl)


QwenImagePipelineWithDualLogProb = DiffusersQwenImagePipelineWithDualLogProb
"""The pipeline's former name, kept for the code and configs that name it. The vllm-omni rollout
pipeline carries it now (verl-omni's name); where vllm-omni is not installed, the rollout registry
answers this path for ``("QwenImagePipeline", "dual_grpo")``."""
