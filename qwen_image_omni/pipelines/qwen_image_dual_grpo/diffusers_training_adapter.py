"""Qwen-Image Dual-GRPO training adapter: FlowGRPO's image step functions plus the text log-probs.

Dual-GRPO rolls out an image (FlowGRPO's SDE window) and a text response sampled from the
Qwen2.5-VL text encoder. The image side of training is FlowGRPO's, inherited unchanged from
:class:`~..qwen_image_flow_grpo.QwenImage`; :meth:`QwenImageDualGRPO.text_log_probs` is the
trainer-side twin of the rollout's text log-probs (``metadata["rl"]["llm_all_log_probs"]``).
verl-omni main registers no training adapter for ``dual_grpo``; this one is ours.
"""

from __future__ import annotations

import torch

from ..checks import check_number
from ..model_base import DiffusionModelBase
from ..qwen_image_flow_grpo.diffusers_training_adapter import QwenImage
from .text_sampling import left_pad_prompts, pad_token_id

__all__ = ["QwenImageDualGRPO"]


@DiffusionModelBase.register("QwenImagePipeline", algorithm="dual_grpo")
class QwenImageDualGRPO(QwenImage):
    """Training adapter for Qwen-Image Dual-GRPO (``("QwenImagePipeline", "dual_grpo")``).

    The image step functions are :class:`QwenImage`'s (the rollout's image side is FlowGRPO's
    loop); :meth:`text_log_probs` rescores the recorded text responses with the text encoder.
    """

    @classmethod
    def text_log_probs(
        cls,
        text_encoder: torch.nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        response_ids: torch.Tensor,
        *,
        temperature: float = 1.0,
        return_all: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the recorded responses under ``text_encoder`` (with grad if it has it).

        One teacher-forced forward over ``[prompt, response]``: the prompt re-packed with left
        padding (:func:`~.text_sampling.left_pad_prompts`, so any collation of the prompt ids gives
        the same numbers) and the response attended in full, as ``generate`` attends it (padding
        after an EOS included; mask it with ``llm_response_mask`` in the loss). The logits are
        divided by ``temperature`` as ``generate``'s sampling does.

        Args:
            text_encoder: the Qwen2.5-VL causal LM (the rollout's text encoder, or the one being trained).
            prompt_ids: ``(B, L)`` templated prompt token ids, any padding layout.
            prompt_mask: their mask; all ones when None.
            response_ids: ``(B, T)`` the rollout's ``llm_response_ids``.
            temperature: the rollout's sampling temperature (1.0 for greedy rollouts, whose scores
                are the raw logits). Top-k / top-p truncation is not applied.
            return_all: also return the full-vocabulary log-probs ``(B, T, V)``.

        Returns:
            ``(B, T)`` float32 log-probs of ``response_ids`` (the rollout's
            ``llm_all_log_probs.gather(-1, llm_response_ids[..., None])``), and with ``return_all``
            the ``(B, T, V)`` float32 log-probs (the rollout's ``llm_all_log_probs``).

        Raises:
            TypeError: ids that are not integer tensors.
            ValueError: a prompt row without valid tokens, a mask or response of the wrong shape,
                a temperature that is not > 0.
        """
        temperature = check_number("`temperature`", temperature, 0.0)
        if temperature == 0.0:
            raise ValueError("`temperature` must be > 0, got 0.0")
        if not isinstance(response_ids, torch.Tensor):
            raise TypeError(f"`response_ids` must be a torch.Tensor, got {type(response_ids).__name__}")
        if response_ids.is_floating_point() or response_ids.dtype == torch.bool:
            raise TypeError(f"`response_ids` must hold integer token ids, got dtype {response_ids.dtype}")
        device = response_ids.device
        ids, mask = left_pad_prompts(
            torch.as_tensor(prompt_ids, device=device), prompt_mask, pad_token_id(text_encoder)
        )
        if response_ids.ndim != 2 or response_ids.shape[0] != ids.shape[0] or response_ids.shape[1] == 0:
            raise ValueError(
                f"`response_ids` must be (batch={ids.shape[0]}, tokens > 0), one response per prompt row, "
                f"got shape {tuple(response_ids.shape)}"
            )
        response_ids = response_ids.long()
        input_ids = torch.cat([ids, response_ids], dim=1)
        attention_mask = torch.cat([mask, torch.ones_like(response_ids)], dim=1)
        logits = text_encoder(input_ids=input_ids, attention_mask=attention_mask).logits
        # The logits at position i predict token i + 1: the last prompt token predicts the first response token.
        width = ids.shape[1]
        logits = logits[:, width - 1 : width - 1 + response_ids.shape[1]].float() / temperature
        all_log_probs = torch.log_softmax(logits, dim=-1)
        token_log_probs = all_log_probs.gather(-1, response_ids[..., None]).squeeze(-1)
        return (token_log_probs, all_log_probs) if return_all else token_log_probs
