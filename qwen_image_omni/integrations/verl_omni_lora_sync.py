"""LoRA weight sync in verl-omni with peft >= 0.21: block state dicts re-rooted for peft.

verl-omni main collects the LoRA weights it sends to the rollout one FSDP block at a time
(``verl_omni.utils.fsdp_utils``): it calls ``get_peft_model_state_dict(model,
state_dict=block.state_dict())`` with keys relative to the block (``attn.to_q.lora_A.default.weight``).
peft 0.21 selects adapter entries by the model's own module paths (``transformer_blocks.0.attn.to_q.lora_A``),
so a block's keys match nothing, every collection comes back empty and verl-omni stops with
``collect_lora_params collected 0 parameters``. That happens for diffusers' transformer as much as for ours:
the mismatch is between verl-omni and peft, not in either model.

:func:`install` wraps the ``get_peft_model_state_dict`` that verl-omni's module calls: when peft finds
nothing in a non-empty state dict, the keys are prefixed with the path of a module of ``model`` that has
exactly those keys, peft is asked again, and the prefix is taken off its answer, so verl-omni gets the
block-relative names it expects. Whatever peft answers on the first try is returned unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["install", "rooted_peft_state_dict"]

_FSDP_WRAPPER = "_fsdp_wrapped_module."


def _module_prefix(model: torch.nn.Module, keys: Iterable[str]) -> str | None:
    """The ``"path."`` of a module of ``model`` whose parameters and buffers are named ``keys``, or None.

    Blocks of one stack share their key names; any of them gives peft the same module structure,
    and the prefix is taken off again, so the first one found is as good as the right one.
    """
    keys = set(keys)
    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    names = [name.replace(_FSDP_WRAPPER, "") for name in names]
    probe = next(iter(keys))
    for name in names:
        if not name.endswith("." + probe):
            continue
        prefix = name[: -len(probe)]
        if all(prefix + key in names for key in keys):
            return prefix
    return None


def rooted_peft_state_dict(get_peft_model_state_dict: Callable[..., dict]) -> Callable[..., dict]:
    """``get_peft_model_state_dict`` that also answers for a state dict of one of ``model``'s submodules."""

    @functools.wraps(get_peft_model_state_dict)
    def wrapper(model: torch.nn.Module, state_dict: dict[str, Any] | None = None, *args: Any, **kwargs: Any) -> dict:
        found = get_peft_model_state_dict(model, state_dict, *args, **kwargs)
        if found or not state_dict:
            return found
        prefix = _module_prefix(model, state_dict)
        if not prefix:
            return found
        rooted = {prefix + key: value for key, value in state_dict.items()}
        found = get_peft_model_state_dict(model, rooted, *args, **kwargs)
        return type(found)((key.removeprefix(prefix), value) for key, value in found.items())

    wrapper.rooted_peft_state_dict = True
    return wrapper


def install() -> None:
    """Wrap the ``get_peft_model_state_dict`` of verl-omni's FSDP utilities (idempotent)."""
    from verl_omni.utils import fsdp_utils

    current = fsdp_utils.get_peft_model_state_dict
    if not getattr(current, "rooted_peft_state_dict", False):
        fsdp_utils.get_peft_model_state_dict = rooted_peft_state_dict(current)
