"""Dual-GRPO's text path: responses sampled from the Qwen2.5-VL text encoder, with their log-probs.

Qwen-Image's text encoder is a full Qwen2.5-VL causal LM. Dual-GRPO trains it together with the
DiT: for every prompt the rollout samples one response per image (``text_encoder.generate`` on the
templated prompt token ids) and records, in ``metadata["rl"]`` (verl-omni main's keys):

- ``llm_response_ids`` ``(n, T)``: the generated tokens, prompt removed (finished rows padded with
  the pad id up to the longest response of the batch, as ``generate`` pads them);
- ``llm_all_log_probs`` ``(n, T, V)`` float32: ``log_softmax`` of ``generate``'s processed scores at
  every generated position (the distribution the token was drawn from), or ``None`` without
  ``llm_logprobs``;
- ``text_encoder_responses``: the decoded responses (special tokens skipped);
- ``llm_response_mask`` ``(n, T)`` (ours): 1 up to and including a row's first end-of-sequence
  token, 0 on the padding after it.

The image path is untouched: the image prompt embeddings are the prompt's own, as in verl-omni.

:class:`QwenImageTextSamplingMixin` is the one implementation, shared by the diffusers and the
vllm-omni rollout pipelines; :func:`left_pad_prompts` is shared with the trainer-side twin
(:meth:`~.diffusers_training_adapter.QwenImageDualGRPO.text_log_probs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..checks import check_int, check_number

__all__ = [
    "LLM_ALL_LOG_PROBS_KEY",
    "LLM_RESPONSE_IDS_KEY",
    "LLM_RESPONSE_MASK_KEY",
    "TEXT_ENCODER_RESPONSES_KEY",
    "TEXT_SAMPLING_OPTIONS",
    "QwenImageTextSamplingMixin",
    "left_pad_prompts",
    "pad_token_id",
    "response_mask",
    "text_sampling_options",
]

LLM_RESPONSE_IDS_KEY = "llm_response_ids"
"""``metadata["rl"]`` key of the generated token ids (verl-omni main's)."""
LLM_ALL_LOG_PROBS_KEY = "llm_all_log_probs"
"""``metadata["rl"]`` key of the full-vocabulary log-probs of every generated position (verl-omni main's)."""
TEXT_ENCODER_RESPONSES_KEY = "text_encoder_responses"
"""``metadata["rl"]`` key of the decoded responses (verl-omni main's)."""
LLM_RESPONSE_MASK_KEY = "llm_response_mask"
"""``metadata["rl"]`` key of the valid-token mask of the responses (ours; verl-omni records none)."""

TEXT_SAMPLING_OPTIONS: dict[str, Any] = {
    "max_new_tokens": 256,
    "llm_logprobs": True,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "repetition_penalty": 1.0,
}
"""The text options read from ``sampling_params.extra_args``, with verl-omni main's defaults.

Greedy or sampled decoding is the text encoder's ``generation_config.do_sample`` (verl-omni passes no
``do_sample``); sampling draws from torch's global random generator, as ``generate`` does.
"""


def text_sampling_options(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`TEXT_SAMPLING_OPTIONS` overridden by the same keys of ``extra_args`` (``None`` values ignored), checked.

    Other keys of ``extra_args`` (the image rollout's) are ignored.

    Raises:
        TypeError: ``extra_args`` is not a mapping; an option of the wrong type.
        ValueError: an option out of range (``temperature`` / ``repetition_penalty`` <= 0, ``top_p``
            outside (0, 1], ``top_k`` < 0, ``max_new_tokens`` < 1).
    """
    if extra_args is None:
        extra_args = {}
    if not isinstance(extra_args, Mapping):
        raise TypeError(f"`extra_args` must be a dict of sampling options, got {type(extra_args).__name__}")
    return _check_options(
        {
            name: default if extra_args.get(name) is None else extra_args[name]
            for name, default in TEXT_SAMPLING_OPTIONS.items()
        }
    )


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validated text options (see :data:`TEXT_SAMPLING_OPTIONS`)."""
    llm_logprobs = options["llm_logprobs"]
    if not isinstance(llm_logprobs, bool):
        raise TypeError(f"`llm_logprobs` must be a bool, got {type(llm_logprobs).__name__} {llm_logprobs!r}")
    temperature = check_number("`temperature`", options["temperature"], 0.0)
    if temperature == 0.0:
        raise ValueError("`temperature` must be > 0 (greedy decoding is generation_config.do_sample=False), got 0.0")
    top_p = check_number("`top_p`", options["top_p"], 0.0)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")
    repetition_penalty = check_number("`repetition_penalty`", options["repetition_penalty"], 0.0)
    if repetition_penalty == 0.0:
        raise ValueError("`repetition_penalty` must be > 0, got 0.0")
    return {
        "max_new_tokens": check_int("`max_new_tokens`", options["max_new_tokens"], 1),
        "llm_logprobs": llm_logprobs,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": check_int("`top_k`", options["top_k"], 0),
        "repetition_penalty": repetition_penalty,
    }


def left_pad_prompts(
    prompt_ids: torch.Tensor | list,
    prompt_mask: torch.Tensor | list | None,
    pad_token_id: int,
    *,
    name: str = "prompt_ids",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's valid tokens moved to the right end: ``(ids, mask)`` left-padded to the longest row.

    A decoder-only model generates (and scores) a batch correctly only with left padding; the
    rows may come right-padded (verl-omni's collation), left-padded or with any mask pattern, and
    the result is the same, so a batch gives what each prompt alone would.

    Args:
        prompt_ids: ``(B, L)`` or ``(L,)`` integer token ids.
        prompt_mask: their 0/1 (or bool) mask of the same shape; all ones when None.
        pad_token_id: id written into the padding columns.
        name: the argument named in error messages.

    Raises:
        TypeError: ids that are not integers.
        ValueError: ids that are not 1-D / 2-D, a mask of another shape, or a row without valid tokens.
    """
    ids = torch.as_tensor(prompt_ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer token ids, got dtype {ids.dtype}")
    ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"`{name}` must be (batch, tokens) or (tokens,) with tokens > 0, got shape {tuple(ids.shape)}")
    mask_name = name.replace("_ids", "_mask") if name.endswith("_ids") else f"{name}_mask"
    if prompt_mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = torch.as_tensor(prompt_mask, device=ids.device)
        mask = mask.unsqueeze(0) if mask.ndim == 1 else mask
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(
                f"`{mask_name}` must have the shape of `{name}` {tuple(ids.shape)}, got {tuple(mask.shape)}"
            )
        mask = mask.bool()
    lengths = mask.sum(dim=1)
    empty = [row for row, length in enumerate(lengths.tolist()) if length == 0]
    if empty:
        raise ValueError(f"rows {empty} of `{name}` have no valid token (all of `{mask_name}` is 0)")
    width = int(lengths.max())
    out_ids = torch.full((ids.shape[0], width), int(pad_token_id), dtype=torch.long, device=ids.device)
    out_mask = torch.zeros((ids.shape[0], width), dtype=torch.long, device=ids.device)
    for row in range(ids.shape[0]):
        valid = ids[row][mask[row]]
        out_ids[row, width - valid.numel() :] = valid
        out_mask[row, width - valid.numel() :] = 1
    return out_ids, out_mask


def _token_ids(config: Any, name: str) -> list[int]:
    """The ids of ``config.<name>`` (an int, a list or None) as a list."""
    value = getattr(config, name, None) if config is not None else None
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(item) for item in value]


def pad_token_id(text_encoder: Any) -> int:
    """The pad id of the text encoder's generation config (or model config), else its first EOS id, else 0."""
    for config in (getattr(text_encoder, "generation_config", None), getattr(text_encoder, "config", None)):
        ids = _token_ids(config, "pad_token_id")
        if ids:
            return ids[0]
    eos = _token_ids(getattr(text_encoder, "generation_config", None), "eos_token_id")
    return eos[0] if eos else 0


def response_mask(response_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """``(n, T)`` long mask: 1 up to and including each row's first EOS token, 0 after it."""
    if not eos_token_ids:
        return torch.ones_like(response_ids, dtype=torch.long)
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    ended_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~ended_before).long()


class QwenImageTextSamplingMixin:
    """Samples Dual-GRPO's text responses from the host pipeline's ``text_encoder`` (and ``tokenizer``).

    Shared by both Dual-GRPO rollout pipelines (diffusers' and vllm-omni's); the host provides
    ``text_encoder`` (Qwen2.5-VL, a transformers ``GenerationMixin``) and ``tokenizer``.
    """

    def sample_text_responses(
        self,
        prompt_ids: torch.Tensor | list,
        prompt_mask: torch.Tensor | None = None,
        *,
        num_responses_per_prompt: int = 1,
        max_new_tokens: int = 256,
        llm_logprobs: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
    ) -> dict[str, Any]:
        """Generate ``num_responses_per_prompt`` responses per prompt; the ``metadata["rl"]`` dict.

        The prompts are re-packed with left padding (:func:`left_pad_prompts`) and repeated
        ``num_responses_per_prompt`` times per prompt (prompt-major, the order of the images), then
        one ``text_encoder.generate`` call samples all rows with verl-omni's generation arguments
        (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``).

        Args:
            prompt_ids: ``(B, L)`` or ``(L,)`` templated prompt token ids.
            prompt_mask: their mask (any padding layout); all ones when None.
            num_responses_per_prompt: responses per prompt (the rollout's images per prompt).
            max_new_tokens: most tokens per response.
            llm_logprobs: record ``llm_all_log_probs``.
            temperature, top_p, top_k, repetition_penalty: ``generate``'s logits processing.

        Returns:
            ``{"llm_response_ids", "llm_all_log_probs", "text_encoder_responses", "llm_response_mask"}``
            (see the module docstring), ``B * num_responses_per_prompt`` rows each.

        Raises:
            ValueError: the pipeline has no text encoder or tokenizer; bad prompt ids or mask; an
                option out of range.
            TypeError: an option of the wrong type.
        """
        text_encoder = getattr(self, "text_encoder", None)
        tokenizer = getattr(self, "tokenizer", None)
        if text_encoder is None or tokenizer is None:
            missing = [
                name for name, value in (("text_encoder", text_encoder), ("tokenizer", tokenizer)) if value is None
            ]
            raise ValueError(f"Dual-GRPO samples text from the text encoder: the pipeline needs {missing}, got None")
        options = _check_options(
            {"max_new_tokens": max_new_tokens, "llm_logprobs": llm_logprobs, "temperature": temperature,
             "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty}
        )  # fmt: skip
        repeats = check_int("`num_responses_per_prompt`", num_responses_per_prompt, 1)
        device = text_encoder.device
        ids, mask = left_pad_prompts(
            torch.as_tensor(prompt_ids, device=device), prompt_mask, pad_token_id(text_encoder)
        )
        ids, mask = ids.repeat_interleave(repeats, dim=0), mask.repeat_interleave(repeats, dim=0)
        return_logprobs = options.pop("llm_logprobs")
        outputs = text_encoder.generate(
            input_ids=ids,
            attention_mask=mask,
            return_dict_in_generate=True,
            output_scores=return_logprobs,
            **options,
        )
        response_ids = outputs.sequences[:, ids.shape[1] :]
        log_probs = None
        if return_logprobs:
            log_probs = torch.log_softmax(torch.stack(outputs.scores, dim=1).float(), dim=-1)
        eos = _token_ids(getattr(text_encoder, "generation_config", None), "eos_token_id")
        return {
            LLM_RESPONSE_IDS_KEY: response_ids,
            LLM_ALL_LOG_PROBS_KEY: log_probs,
            TEXT_ENCODER_RESPONSES_KEY: tokenizer.batch_decode(response_ids, skip_special_tokens=True),
            LLM_RESPONSE_MASK_KEY: response_mask(response_ids, eos),
        }
