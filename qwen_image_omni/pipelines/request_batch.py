"""Packed request batches: the per-request fields a rollout pipeline collates into batch tensors.

verl-omni's rollout server sends each request a prompt dict with templated token ids
(``prompt_token_ids``, optional ``prompt_mask``, ``negative_prompt_ids``, ``negative_prompt_mask``).
A rollout pipeline that takes a packed batch collates them here; the per-row SDE windows and
generators are :func:`~qwen_image_omni.pipelines.qwen_image.sde_window.sample_sde_windows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["NEGATIVE_TOKEN_ID_KEYS", "PROMPT_TOKEN_ID_KEYS", "collate_token_ids"]

PROMPT_TOKEN_ID_KEYS: tuple[tuple[str, ...], str] = (("prompt_token_ids", "prompt_ids"), "prompt_mask")
"""Where a request carries its prompt's token ids (either name) and their mask."""

NEGATIVE_TOKEN_ID_KEYS: tuple[tuple[str, ...], str] = (("negative_prompt_ids",), "negative_prompt_mask")
"""Where a request carries its negative prompt's token ids and their mask."""


def _row(value: Any, name: str, index: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.ndim == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 1 or tensor.numel() == 0:
        raise ValueError(f"request {index}: `{name}` must be a non-empty 1-D token sequence, got shape {tuple(tensor.shape)}")
    return tensor


def collate_token_ids(
    prompts: Sequence[Any], keys: tuple[tuple[str, ...], str], device: torch.device | str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Right-pad every request's token ids (and mask) into ``(N, L)`` tensors; ``(None, None)`` if none has them.

    A request without a mask gets ones over its tokens; padding columns are id 0 with mask 0. A
    request's own mask (left padding, say) is kept as it is.

    Args:
        prompts: the requests' prompts (dicts; plain strings carry no token ids).
        keys: ``(id_names, mask_name)``, e.g. :data:`PROMPT_TOKEN_ID_KEYS`.
        device: where the tensors go.

    Raises:
        ValueError: some requests carry token ids and others do not; a mask whose length is not
            its ids'; ids that are not one non-empty 1-D sequence.
    """
    id_names, mask_name = keys
    rows: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for index, prompt in enumerate(prompts):
        fields = prompt if isinstance(prompt, Mapping) else {}
        name = next((key for key in id_names if fields.get(key) is not None), None)
        if name is None:
            rows.append(None)
            continue
        ids = _row(fields[name], name, index).long()
        mask = fields.get(mask_name)
        mask = torch.ones_like(ids) if mask is None else _row(mask, mask_name, index).long()
        if mask.shape != ids.shape:
            raise ValueError(f"request {index}: `{mask_name}` has {mask.numel()} entries for {ids.numel()} token ids")
        rows.append((ids, mask))
    if all(row is None for row in rows):
        return None, None
    if any(row is None for row in rows):
        missing = [index for index, row in enumerate(rows) if row is None]
        raise ValueError(f"requests {missing} carry no {' / '.join(id_names)} while others do; cannot batch them")
    width = max(ids.numel() for ids, _ in rows)
    token_ids = torch.zeros(len(rows), width, dtype=torch.long)
    masks = torch.zeros(len(rows), width, dtype=torch.long)
    for index, (ids, mask) in enumerate(rows):
        token_ids[index, : ids.numel()] = ids
        masks[index, : ids.numel()] = mask
    return token_ids.to(device), masks.to(device)
