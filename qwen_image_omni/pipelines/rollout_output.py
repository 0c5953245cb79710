"""The rollout output contract of verl-omni main, shared by every rollout pipeline (diffusers and vllm-omni).

A rollout hands the trainer two things besides the image:

- trajectories, as vllm-omni's native ``DiffusionOutput`` fields ``trajectory_latents``
  ``(n, W + 1, S, C)``, ``trajectory_log_probs`` ``(n, W)`` and ``trajectory_timesteps`` ``(n, W)``;
- everything else in the output envelope ``{"payload": {"image": ...}, "metadata": {...}}``:
  ``metadata["prompt_embeddings"]`` (``prompt_embeds``, ``prompt_embeds_mask`` and the negative
  pair) and ``metadata["rl"]`` (the algorithm's own tensors: clean latents, condition latents, ...).

verl-omni's rollout server copies every key of those two metadata groups into the sample's
``extra_fields``, which is how prompt embeddings reach its trainer; a key may appear in only one group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "MEDIA_KEYS",
    "PROMPT_EMBEDDING_KEYS",
    "envelope_media",
    "per_request_rollouts",
    "rollout_envelope",
    "slice_rows",
]

MEDIA_KEYS: tuple[str, ...] = ("image", "video", "output", "audio")
"""Payload keys that hold the generated media, in the order verl-omni looks for them."""

PROMPT_EMBEDDING_KEYS: tuple[str, ...] = (
    "prompt_embeds",
    "prompt_embeds_mask",
    "negative_prompt_embeds",
    "negative_prompt_embeds_mask",
)
"""The keys of ``metadata["prompt_embeddings"]``."""


def rollout_envelope(
    media: Any,
    *,
    media_key: str = "image",
    prompt_embeddings: Mapping[str, Any] | None = None,
    rl: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``{"payload": {media_key: media}, "metadata": {"prompt_embeddings": ..., "rl": ...}}``.

    A group that is ``None`` is left out; ``None`` values inside a group are kept (the trainer
    tells "no negative prompt" from a missing key).

    Raises:
        ValueError: ``media_key`` is not one of :data:`MEDIA_KEYS`, or a key is in both groups.
    """
    if media_key not in MEDIA_KEYS:
        raise ValueError(f"`media_key` must be one of {MEDIA_KEYS}, got {media_key!r}")
    metadata: dict[str, Any] = {}
    if prompt_embeddings is not None:
        metadata["prompt_embeddings"] = dict(prompt_embeddings)
    if rl is not None:
        shared = sorted(set(rl) & set(prompt_embeddings or {}))
        if shared:
            raise ValueError(f"rollout metadata keys {shared} are in both 'prompt_embeddings' and 'rl'")
        metadata["rl"] = dict(rl)
    return {"payload": {media_key: media}, "metadata": metadata}


def envelope_media(output: Any) -> Any:
    """The media of an envelope (the first of :data:`MEDIA_KEYS` in its payload), or ``output`` itself."""
    if isinstance(output, Mapping) and isinstance(output.get("payload"), Mapping):
        for key in MEDIA_KEYS:
            if key in output["payload"]:
                return output["payload"][key]
        raise ValueError(f"the output envelope has no media; payload keys: {sorted(output['payload'])}")
    return output


def slice_rows(value: Any, rows: slice, batch_size: int) -> Any:
    """Rows ``rows`` of every tensor, array or list in ``value`` whose leading size is ``batch_size``.

    Dicts and tuples are sliced item by item; anything else (shared timestep axes, scalars, None)
    is returned as it is.
    """
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value[rows] if value.ndim > 0 and value.shape[0] == batch_size else value
    if isinstance(value, Mapping):
        return {key: slice_rows(item, rows, batch_size) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(slice_rows(item, rows, batch_size) for item in value)
    if isinstance(value, list):
        return value[rows] if len(value) == batch_size else value
    return value


def per_request_rollouts(
    *,
    media: Any,
    trajectory_latents: torch.Tensor | None,
    trajectory_log_probs: torch.Tensor | None,
    trajectory_timesteps: torch.Tensor | None,
    prompt_embeddings: Mapping[str, Any] | None,
    rl: Mapping[str, Any] | None,
    num_requests: int,
    rows_per_request: int,
) -> list[dict[str, Any]]:
    """Split a packed rollout into one dict per request: the keyword arguments of a ``DiffusionOutput``.

    Each dict holds ``output`` (the request's envelope, :func:`rollout_envelope`) and its rows of the
    three ``trajectory_*`` tensors. Rows ``[i * rows_per_request, (i + 1) * rows_per_request)``
    belong to request ``i``.
    """
    batch_size = num_requests * rows_per_request
    requests = []
    for index in range(num_requests):
        rows = slice(index * rows_per_request, (index + 1) * rows_per_request)
        requests.append(
            {
                "output": rollout_envelope(
                    slice_rows(media, rows, batch_size),
                    prompt_embeddings=slice_rows(prompt_embeddings, rows, batch_size),
                    rl=slice_rows(rl, rows, batch_size),
                ),
                "trajectory_latents": slice_rows(trajectory_latents, rows, batch_size),
                "trajectory_log_probs": slice_rows(trajectory_log_probs, rows, batch_size),
                "trajectory_timesteps": slice_rows(trajectory_timesteps, rows, batch_size),
            }
        )
    return requests
