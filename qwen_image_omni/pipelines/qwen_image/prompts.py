"""A batch of encoded prompts for a Qwen-Image rollout or trainer step: the positive pair and, for true CFG, the negative."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

PADDING_SIDES = ("right", "left")


@dataclass
class PromptBatch:
    """Prompt embeddings and masks, positive and (for true CFG) negative, under diffusers' argument names.

    Widths are free: each side may be padded to any width, on either side, since our transformer
    reads the text length from the tensor width and the mask marks the valid tokens. A negative
    prompt of one row is repeated for every sample.

    Args:
        prompt_embeds: ``(B, L, D)`` prompt embeddings.
        prompt_embeds_mask: ``(B, L)`` their mask (1 = valid token), or None for all valid.
        negative_prompt_embeds: ``(B or 1, L', D)`` negative embeddings, or None without true CFG.
        negative_prompt_embeds_mask: ``(B or 1, L')`` their mask, or None.

    Raises:
        TypeError: embeddings that are not tensors.
        ValueError: embeddings that are not 3-D, a mask whose shape is not the embeddings' first two
            dims, a negative batch other than 1 or ``B``, or a negative mask without negative embeddings.
    """

    prompt_embeds: torch.Tensor
    prompt_embeds_mask: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_prompt_pair("prompt_embeds", self.prompt_embeds, self.prompt_embeds_mask)
        if self.negative_prompt_embeds is None:
            if self.negative_prompt_embeds_mask is not None:
                raise ValueError("`negative_prompt_embeds_mask` is given without `negative_prompt_embeds`")
            return
        check_prompt_pair("negative_prompt_embeds", self.negative_prompt_embeds, self.negative_prompt_embeds_mask)
        batch_size, negatives = self.batch_size, self.negative_prompt_embeds.shape[0]
        if negatives == batch_size:
            return
        if negatives != 1:
            raise ValueError(
                f"the negative prompt must have 1 or batch={batch_size} samples (as the prompt), got {negatives}"
            )
        self.negative_prompt_embeds = self.negative_prompt_embeds.expand(batch_size, -1, -1)
        if self.negative_prompt_embeds_mask is not None:
            self.negative_prompt_embeds_mask = self.negative_prompt_embeds_mask.expand(batch_size, -1)

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[torch.Tensor],
        negative_rows: Sequence[torch.Tensor] | None = None,
        width: int | None = None,
        padding_side: str = "right",
    ) -> PromptBatch:
        """Collate unpadded ``(n_i, D)`` embeddings (and negative ones) with :func:`pad_prompt_rows`."""
        negative = (None, None) if negative_rows is None else pad_prompt_rows(negative_rows, width, padding_side)
        return cls(*pad_prompt_rows(rows, width, padding_side), *negative)

    @property
    def batch_size(self) -> int:
        """Samples in the batch, ``B``."""
        return self.prompt_embeds.shape[0]

    @property
    def do_true_cfg(self) -> bool:
        """Whether the batch carries a negative prompt (true CFG runs with it)."""
        return self.negative_prompt_embeds is not None

    @property
    def positive(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds, prompt_embeds_mask)``."""
        return self.prompt_embeds, self.prompt_embeds_mask

    @property
    def negative(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(negative_prompt_embeds, negative_prompt_embeds_mask)``, ``(None, None)`` without true CFG."""
        return self.negative_prompt_embeds, self.negative_prompt_embeds_mask

    def as_dict(self) -> dict[str, Any]:
        """The four tensors under their names (``metadata["prompt_embeddings"]`` of a rollout's envelope)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


def pad_prompt_rows(
    rows: Sequence[torch.Tensor], width: int | None = None, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad unpadded ``(n_i, D)`` embeddings to one ``(B, width, D)`` tensor and its ``(B, width)`` long mask.

    Args:
        rows: one ``(n_i, D)`` tensor per sample, all of one dim ``D``, dtype and device.
        width: the padded width; default the longest row.
        padding_side: ``"right"`` (valid tokens first) or ``"left"`` (valid tokens last).

    Raises:
        ValueError: no rows, rows of other dims, a width below the longest row, an unknown side.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"`padding_side` must be one of {PADDING_SIDES}, got {padding_side!r}")
    if not rows or any(not isinstance(row, torch.Tensor) or row.ndim != 2 for row in rows):
        raise ValueError("`rows` must be a non-empty sequence of (tokens, dim) tensors")
    if len({row.shape[1] for row in rows}) != 1:
        raise ValueError(f"`rows` must share one dim, got {sorted({row.shape[1] for row in rows})}")
    longest = max(row.shape[0] for row in rows)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"`width` must be >= the longest row ({longest}), got {width}")
    embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    for index, row in enumerate(rows):
        columns = slice(0, row.shape[0]) if padding_side == "right" else slice(width - row.shape[0], width)
        embeds[index, columns] = row
        mask[index, columns] = 1
    return embeds, mask


def check_prompt_pair(name: str, embeds: Any, mask: Any) -> None:
    """``embeds`` a ``(B, L, D)`` tensor and ``mask`` None or ``(B, L)``; errors name ``name`` / ``name_mask``."""
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(embeds).__name__}")
    if embeds.ndim != 3:
        raise ValueError(f"`{name}` must be (batch, width, dim), got shape {tuple(embeds.shape)}")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`{name}_mask` must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(f"`{name}_mask` must have shape {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}")
