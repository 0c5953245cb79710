"""Prompt embeddings from templated token ids, the way RL frameworks send prompts to a rollout."""

from __future__ import annotations

import torch

from ..checks import check_int
from .prompts import check_prompt_pair


class QwenImageTokenIdPrompts:
    """Prompt embeddings from templated token ids, for rollout pipelines (diffusers' and vllm-omni's).

    RL frameworks send rollouts token ids, not text (verl-omni's rollout server sends each request
    ``prompt_token_ids``, ``prompt_mask`` and ``negative_prompt_ids``). The host pipeline provides
    Qwen-Image's ``text_encoder``, ``prompt_template_encode_start_idx`` and ``_extract_masked_hidden``.
    """

    def encode_prompt_ids(
        self,
        prompt_ids: torch.Tensor | list[int] | None,
        attention_mask: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 512,
        name: str = "prompt",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and mask from token ids (or from precomputed embeddings).

        Embeddings are right-padded to the longest prompt, cut to ``max_sequence_length`` and
        repeated ``num_images_per_prompt`` times per sample. The mask is always returned (all ones
        when none was given), so the trainer gets the same tensors the rollout used.

        Args:
            prompt_ids: token ids ``(B, N)`` / ``(N,)``; ignored when ``prompt_embeds`` is given.
            attention_mask: mask of ``prompt_ids``.
            prompt_embeds: precomputed ``(B, L, D)`` embeddings.
            prompt_embeds_mask: their ``(B, L)`` mask.
            num_images_per_prompt: repeats per sample.
            max_sequence_length: maximum width kept.
            name: the argument family named in error messages (``"prompt"`` / ``"negative_prompt"``).
        """
        if prompt_embeds is None:
            if prompt_ids is None:
                raise ValueError(f"pass `{name}_embeds` or token ids for the {name}, got neither")
            prompt_embeds, prompt_embeds_mask = self._embed_token_ids(prompt_ids, attention_mask, name)
        check_prompt_pair(f"{name}_embeds", prompt_embeds, prompt_embeds_mask)
        if prompt_embeds_mask is None:
            prompt_embeds_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        max_sequence_length = check_int("`max_sequence_length`", max_sequence_length, 1)
        prompt_embeds = prompt_embeds[:, :max_sequence_length]
        prompt_embeds_mask = prompt_embeds_mask[:, :max_sequence_length]
        repeats = check_int("`num_images_per_prompt`", num_images_per_prompt, 1)
        return prompt_embeds.repeat_interleave(repeats, dim=0), prompt_embeds_mask.repeat_interleave(repeats, dim=0)

    def _embed_token_ids(
        self, prompt_ids: torch.Tensor | list[int], attention_mask: torch.Tensor | None, name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the text encoder on templated token ids; keep the last hidden state of the valid tokens."""
        if self.text_encoder is None:
            raise ValueError(f"token ids for the {name} need a `text_encoder`; pass `{name}_embeds` instead")
        device = self.text_encoder.device
        prompt_ids = torch.as_tensor(prompt_ids, device=device)
        prompt_ids = prompt_ids.unsqueeze(0) if prompt_ids.ndim == 1 else prompt_ids
        if prompt_ids.ndim != 2:
            raise ValueError(
                f"token ids for the {name} must be (batch, tokens) or (tokens,), got {tuple(prompt_ids.shape)}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(prompt_ids)
        attention_mask = attention_mask.to(device).reshape(prompt_ids.shape)
        outputs = self.text_encoder(input_ids=prompt_ids, attention_mask=attention_mask, output_hidden_states=True)
        drop = self.prompt_template_encode_start_idx
        rows = [row[drop:] for row in self._extract_masked_hidden(outputs.hidden_states[-1], attention_mask)]
        if min(row.shape[0] for row in rows) == 0:
            raise ValueError(
                f"every {name} must have more than prompt_template_encode_start_idx={drop} valid tokens "
                "(the chat template prefix that is dropped)"
            )
        width = max(row.shape[0] for row in rows)
        embeds = torch.stack([torch.cat([row, row.new_zeros(width - row.shape[0], row.shape[1])]) for row in rows])
        mask = torch.stack(
            [torch.arange(width, device=device) < row.shape[0] for row in rows]
        ).to(torch.long)
        return embeds.to(self.text_encoder.dtype), mask
