"""Emulation of the legacy vllm-omni text-RoPE length, for comparisons and tests.

vllm-omni's Qwen-Image pipelines computed ``txt_seq_lens = prompt_embeds_mask.sum(dim=1)`` and its
``QwenEmbedRope`` sliced the text table with
``txt_freqs = pos_freqs[max_vid_index : max_vid_index + max(txt_seq_lens)]``. The transformer then
applied that table to all ``encoder_hidden_states.shape[1]`` text positions. When the prompt is
wider than its valid tokens (fixed-width collation, continuous-batching padding), the table is
too short. diffusers, and this package, size the table by ``encoder_hidden_states.shape[1]``.

This module reproduces the legacy behaviour on any model with diffusers' API (ours or diffusers'
class) by passing the model's ``pos_embed`` output through a filter for one call: it truncates the
text table to ``max(mask.sum(dim=1))`` rows. Nothing is copied, nothing on the model is replaced,
and other threads using the same model meanwhile are not affected.

Two flavours, because the short table fails differently depending on who applies it:

- ``mode="native"``: the short table is applied as is. On diffusers' eager path the rotary
  multiply cannot broadcast ``[max_len]`` rows against ``[width]`` positions and raises a
  RuntimeError, as vllm-omni's native path does; our model's fused op rejects the short table
  up front with a ValueError.
- ``mode="kernel"``: fused rotary kernels read the table per position and leave positions past its
  end unrotated. Emulated by padding the table with identity rotations (``1 + 0j``) up to the
  width, so the forward runs; image outputs then differ from diffusers wherever a valid token sits
  at or past ``max(mask.sum())`` (e.g. left padding). With right padding every such position is
  masked out of attention, so the image outputs still match.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

import torch
from torch import nn

MODES = ("native", "kernel")


def legacy_txt_seq_len(encoder_hidden_states_mask: torch.Tensor) -> int:
    """The text RoPE length vllm-omni used: ``max(mask.sum(dim=1))`` over the batch.

    Args:
        encoder_hidden_states_mask: ``[batch, width]`` mask, 1 (or True) for valid tokens.
    """
    if encoder_hidden_states_mask is None:
        raise ValueError("encoder_hidden_states_mask is required: the legacy length is max(mask.sum(dim=1)), got None")
    if encoder_hidden_states_mask.dim() != 2:
        raise ValueError(
            "encoder_hidden_states_mask must be 2-D [batch, width], "
            f"got shape {tuple(encoder_hidden_states_mask.shape)}"
        )
    return int(encoder_hidden_states_mask.to(torch.long).sum(dim=1).max())


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def legacy_txt_freqs(txt_freqs: torch.Tensor, txt_seq_len: int, mode: str) -> torch.Tensor:
    """Turn the full-width text table into the legacy one.

    Args:
        txt_freqs: ``[width, D/2]`` complex table the model's RoPE module returned (rows start at
            ``max_vid_index``, so its first ``txt_seq_len`` rows are exactly vllm-omni's slice).
        txt_seq_len: legacy length, ``max(mask.sum(dim=1))``.
        mode: ``"native"`` returns the short table; ``"kernel"`` pads it with identity rotations
            back to ``width`` rows (what a fused kernel does past the end of its table).
    """
    _check_mode(mode)
    if not torch.is_complex(txt_freqs):
        raise ValueError(f"txt_freqs must be a complex [width, D/2] RoPE table, got dtype {txt_freqs.dtype}")
    width = txt_freqs.shape[0]
    if not 0 <= txt_seq_len <= width:
        raise ValueError(f"txt_seq_len must be in [0, {width}] (the table width), got {txt_seq_len}")
    short = txt_freqs[:txt_seq_len]
    if mode == "native":
        return short
    identity = torch.ones(width - txt_seq_len, txt_freqs.shape[1], dtype=txt_freqs.dtype, device=txt_freqs.device)
    return torch.cat([short, identity], dim=0)


# The legacy length in effect for each RoPE module, per thread / async context: {id(pos_embed): (len, mode)}.
_ACTIVE: contextvars.ContextVar[dict[int, tuple[int, str]]] = contextvars.ContextVar("legacy_text_rope", default={})
# One forward hook per RoPE module while any context uses it: {id(pos_embed): (hook handle, users)}.
_HOOKS: dict[int, tuple[object, int]] = {}
_HOOKS_LOCK = threading.Lock()


def _legacy_output_hook(module: nn.Module, args, output):
    """Forward hook: the legacy text table when this context asked for it, the output unchanged otherwise."""
    active = _ACTIVE.get().get(id(module))
    if active is None:
        return None
    img_freqs, txt_freqs = output
    return img_freqs, legacy_txt_freqs(txt_freqs, *active)


def _acquire_hook(pos_embed: nn.Module) -> None:
    with _HOOKS_LOCK:
        handle, users = _HOOKS.get(id(pos_embed), (None, 0))
        if handle is None:
            handle = pos_embed.register_forward_hook(_legacy_output_hook)
        _HOOKS[id(pos_embed)] = (handle, users + 1)


def _release_hook(pos_embed: nn.Module) -> None:
    with _HOOKS_LOCK:
        handle, users = _HOOKS[id(pos_embed)]
        if users == 1:
            handle.remove()
            del _HOOKS[id(pos_embed)]
        else:
            _HOOKS[id(pos_embed)] = (handle, users - 1)


@contextlib.contextmanager
def legacy_text_rope(model: nn.Module, txt_seq_len: int, mode: str = "native") -> Iterator[nn.Module]:
    """Context manager: ``model``'s RoPE module returns the legacy text table while inside.

    Thread-safe and re-entrant: nothing on the model is replaced. A forward hook on
    ``model.pos_embed`` (one per module, shared and reference-counted, removed when the last user
    leaves) passes the ``(img_freqs, txt_freqs)`` output through :func:`legacy_txt_freqs` only in
    the thread (or async context) that entered this manager; other threads calling the same model
    meanwhile get its normal output.

    Args:
        model: a Qwen-Image transformer with a ``pos_embed`` module returning ``(img_freqs, txt_freqs)``.
        txt_seq_len: legacy text RoPE length, see :func:`legacy_txt_seq_len`.
        mode: ``"native"`` or ``"kernel"``, see the module docstring.
    """
    _check_mode(mode)
    pos_embed = getattr(model, "pos_embed", None)
    if not isinstance(pos_embed, nn.Module):
        raise ValueError(f"model must have a `pos_embed` RoPE module, got {type(pos_embed).__name__}")
    _acquire_hook(pos_embed)
    token = _ACTIVE.set({**_ACTIVE.get(), id(pos_embed): (txt_seq_len, mode)})
    try:
        yield model
    finally:
        _ACTIVE.reset(token)
        _release_hook(pos_embed)


def legacy_forward(model: nn.Module, mode: str = "native", **forward_kwargs):
    """Run ``model(**forward_kwargs)`` the way legacy vllm-omni sized the text RoPE table.

    The legacy length is ``max(encoder_hidden_states_mask.sum(dim=1))``; everything else is the
    model's own forward. With ``mode="native"`` a too-short table raises the model's error
    (RuntimeError in diffusers' class, ValueError in ours; not caught here); with ``mode="kernel"``
    the forward runs.

    Args:
        model: ours or diffusers' ``QwenImageTransformer2DModel`` (same forward API).
        mode: ``"native"`` or ``"kernel"``.
        **forward_kwargs: the model's forward arguments; ``encoder_hidden_states_mask`` is required.
    """
    txt_seq_len = legacy_txt_seq_len(forward_kwargs.get("encoder_hidden_states_mask"))
    with legacy_text_rope(model, txt_seq_len, mode):
        return model(**forward_kwargs)


@contextlib.contextmanager
def legacy_rope_per_call(model: nn.Module, mode: str = "kernel") -> Iterator[nn.Module]:
    """Inside, every forward of ``model`` sizes its text RoPE table as legacy vllm-omni did.

    Each call uses ``max(mask.sum(dim=1))`` of its own ``encoder_hidden_states_mask`` (so the
    positive and negative CFG branches get their own lengths, as vllm-omni threaded one length
    list per branch), through :func:`legacy_text_rope`.
    """
    calls = contextlib.ExitStack()

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        length = legacy_txt_seq_len(kwargs["encoder_hidden_states_mask"])
        calls.enter_context(legacy_text_rope(module, length, mode))

    def leave(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        calls.close()

    pre = model.register_forward_pre_hook(enter, with_kwargs=True)
    post = model.register_forward_hook(leave, with_kwargs=True)
    try:
        yield model
    finally:
        pre.remove()
        post.remove()
        calls.close()
