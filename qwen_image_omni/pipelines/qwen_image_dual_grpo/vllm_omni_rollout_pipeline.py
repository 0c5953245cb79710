"""Qwen-Image Dual-GRPO rollout pipeline on vllm-omni (needs vllm-omni; imported when an engine asks for it).

verl-omni main's ``QwenImagePipelineWithDualLogProb`` contract: each request's ``DiffusionOutput``
carries FlowGRPO's trajectory and envelope, with the text response sampled from the text encoder in
``metadata["rl"]`` (``llm_response_ids``, ``llm_all_log_probs``, ``text_encoder_responses``; ours
adds ``llm_response_mask``). The text options come from ``sampling_params.extra_args``
(:data:`~.text_sampling.TEXT_SAMPLING_OPTIONS`).
"""

from __future__ import annotations

from typing import Any

from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch

from ..qwen_image import RolloutRun
from ..qwen_image_flow_grpo.vllm_omni_rollout_pipeline import QwenImagePipelineWithLogProb
from ..request_batch import PROMPT_TOKEN_ID_KEYS, collate_token_ids
from .diffusers_training_adapter import QwenImageDualGRPO
from .text_sampling import QwenImageTextSamplingMixin, text_sampling_options

__all__ = ["QwenImagePipelineWithDualLogProb"]


class QwenImagePipelineWithDualLogProb(QwenImageTextSamplingMixin, QwenImagePipelineWithLogProb):
    """Dual-GRPO rollout on vllm-omni: the FlowGRPO vllm-omni rollout plus one text response per image.

    Requests must carry templated token ids (``prompt_token_ids`` / ``prompt_ids``, verl-omni's
    rollout server sends them); the text is sampled after the image rollout, as verl-omni does.
    """

    training_adapter = QwenImageDualGRPO
    algorithm = "dual_grpo"

    def request_arguments(self, req: DiffusionRequestBatch) -> dict[str, Any]:
        """FlowGRPO's arguments plus the collated prompt token ids and the text options.

        Adds ``text_prompt_ids`` / ``text_prompt_mask`` (the requests' token ids, right-padded by
        :func:`~..request_batch.collate_token_ids`) and ``text_options`` (``extra_args`` over
        :data:`~.text_sampling.TEXT_SAMPLING_OPTIONS`).

        Raises:
            ValueError: the requests carry no prompt token ids (or only some of them do).
        """
        arguments = super().request_arguments(req)
        device = self.text_encoder.device if self.text_encoder is not None else "cpu"
        ids, mask = collate_token_ids(req.prompts, PROMPT_TOKEN_ID_KEYS, device)
        if ids is None:
            raise ValueError(
                "Dual-GRPO samples text from the prompt: every request needs `prompt_token_ids` "
                "(or `prompt_ids`), got requests without token ids"
            )
        arguments.update(
            text_prompt_ids=ids,
            text_prompt_mask=mask,
            text_options=text_sampling_options(req.sampling_params_list[0].extra_args),
        )
        return arguments

    def rollout_rl(self, run: RolloutRun) -> dict[str, Any]:
        """The text responses of the batch, ``num_images_per_prompt`` per request (:meth:`sample_text_responses`).

        In vllm-omni's step execution the batch is one request, sampled when its image is done.
        """
        arguments = run.context["arguments"]
        return self.sample_text_responses(
            arguments["text_prompt_ids"],
            arguments["text_prompt_mask"],
            num_responses_per_prompt=arguments["num_images_per_prompt"],
            **arguments["text_options"],
        )
