"""What a Qwen-Image training adapter reads from its inputs: micro-batch scalars, one step of a trajectory, the dtype."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..checks import check_step


def micro_batch_value(micro_batch: Any, key: str) -> Any:
    """``micro_batch[key]`` as a Python scalar, or None: from a dict or a TensorDict (tensor or non-tensor data)."""
    if micro_batch is None:
        return None
    value = micro_batch.get(key, None)
    if type(value).__name__.startswith("NonTensor"):  # tensordict's NonTensorData / NonTensorStack
        value = value.tolist()
    if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
        values = set(torch.as_tensor(value).reshape(-1).tolist())
        if len(values) != 1:
            raise ValueError(
                f"micro_batch[{key!r}] must hold one value for the whole micro-batch, got {sorted(values)}"
            )
        value = values.pop()
    return value.item() if isinstance(value, np.generic) else value


def select_step(tensor: torch.Tensor, step: int, selected_ndim: int, name: str) -> torch.Tensor:
    """``tensor[:, step]`` for a trajectory (``selected_ndim + 1`` dims), ``tensor`` itself if already selected."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim == selected_ndim + 1:
        return tensor[:, check_step(step, tensor, name)]
    if tensor.ndim == selected_ndim:
        return tensor
    raise ValueError(
        f"`{name}` must have {selected_ndim + 1} dims (a trajectory) or {selected_ndim} (one step), "
        f"got shape {tuple(tensor.shape)}"
    )


def module_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating parameter (what its input projections expect)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None
