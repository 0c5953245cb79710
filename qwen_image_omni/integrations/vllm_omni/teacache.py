"""vllm-omni TeaCache (``cache_backend="tea_cache"``) for our Qwen-Image transformer.

vllm-omni's TeaCache hook replaces the transformer's ``forward`` and asks an *extractor*, looked
up by the transformer's class name, to split one forward into: the block inputs, the modulated
input of block 0 (what TeaCache compares between steps), a callable running the blocks, and a
callable for the output head. vllm-omni's extractor for ``QwenImageTransformer2DModel`` reads the
internals of vllm-omni's own transformer (``image_rope_prepare``, ``txt_seq_lens``, ...), which
ours, sharing the class name, does not have.

:func:`register_teacache_extractor` (called by the plugin's ``register``) puts a dispatcher under
that name: our transformer goes to :func:`extract_teacache_context`, anything else (vllm-omni's
own transformer, in an engine started without our pipelines) to the extractor vllm-omni had
registered. The polynomial that rescales TeaCache's relative L1 distances is vllm-omni's
Qwen-Image one (:func:`teacache_coefficients`); vllm-omni's backend picks it by the same class name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from vllm_omni.diffusion.cache.teacache import config as teacache_config
from vllm_omni.diffusion.cache.teacache import extractors as teacache_extractors
from vllm_omni.diffusion.cache.teacache.extractors import CacheContext

from ...models.transformer_qwenimage import QwenImageTransformer2DModel, modulate

__all__ = ["extract_teacache_context", "register_teacache_extractor", "teacache_coefficients"]

TRANSFORMER_TYPE = QwenImageTransformer2DModel.__name__
"""The registry key vllm-omni derives from ``type(pipeline.transformer).__name__`` (shared with vllm-omni's class)."""


def teacache_coefficients() -> list[float]:
    """vllm-omni's TeaCache rescaling polynomial for Qwen-Image (5 coefficients, highest power first).

    Read from vllm-omni's table at call time, so a vllm-omni that retunes them is followed.
    """
    return list(teacache_config._MODEL_COEFFICIENTS[TRANSFORMER_TYPE])


def extract_teacache_context(
    module: QwenImageTransformer2DModel,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_hidden_states_mask: torch.Tensor | None = None,
    timestep: torch.Tensor | None = None,
    img_shapes: list | None = None,
    guidance: torch.Tensor | None = None,
    attention_kwargs: dict[str, Any] | None = None,
    controlnet_block_samples: list[torch.Tensor] | None = None,
    additional_t_cond: torch.Tensor | None = None,
    return_dict: bool = True,
    **legacy_kwargs: Any,
) -> CacheContext:
    """Split one forward of our transformer into vllm-omni's TeaCache :class:`CacheContext`.

    Takes :meth:`QwenImageTransformer2DModel.forward`'s arguments and runs the transformer's public
    split of its forward: :meth:`~QwenImageTransformer2DModel.prepare_blocks` now (inputs checked as
    ``forward`` checks them, embeddings, RoPE from the text width), then
    ``run_transformer_blocks()`` is :meth:`~QwenImageTransformer2DModel.run_blocks` and
    ``postprocess(h)`` :meth:`~QwenImageTransformer2DModel.output_head`: run in turn, they give
    ``forward``'s output. The modulated input is block 0's AdaLN-modulated image stream (the tensor
    its attention takes, :func:`~qwen_image_omni.models.transformer_qwenimage.modulate`).

    Raises:
        NotImplementedError: a LoRA ``scale`` other than 1 in ``attention_kwargs`` (PEFT scaling is
            not applied on the TeaCache path).
        ValueError, TypeError: invalid inputs, as ``forward`` raises them.
    """
    attention_kwargs = dict(attention_kwargs or {})
    if attention_kwargs.pop("scale", 1.0) != 1.0:
        raise NotImplementedError("a LoRA `scale` in attention_kwargs is not supported with vllm-omni's TeaCache")
    blocks = module.prepare_blocks(
        hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes, guidance,
        attention_kwargs, controlnet_block_samples, additional_t_cond, **legacy_kwargs,
    )  # fmt: skip

    # What TeaCache compares between steps: block 0's modulated image stream.
    block0 = module.transformer_blocks[0]
    img_mod1 = block0.img_mod(blocks.temb).chunk(2, dim=-1)[0]
    modulated_input, _ = modulate(block0.img_norm1(blocks.hidden_states), img_mod1, blocks.modulate_index)

    return CacheContext(
        modulated_input=modulated_input,
        hidden_states=blocks.hidden_states,
        encoder_hidden_states=blocks.encoder_hidden_states,
        temb=blocks.temb,
        run_transformer_blocks=lambda: module.run_blocks(blocks),
        postprocess=lambda h: module.output_head(h, blocks, return_dict),
    )


def _dispatching_extractor(fallback: Callable[..., CacheContext]) -> Callable[..., CacheContext]:
    """An extractor sending our transformer to :func:`extract_teacache_context`, any other to ``fallback``."""

    def extract(module: torch.nn.Module, *args: Any, **kwargs: Any) -> CacheContext:
        if isinstance(module, QwenImageTransformer2DModel):
            return extract_teacache_context(module, *args, **kwargs)
        return fallback(module, *args, **kwargs)

    extract.fallback = fallback
    return extract


def register_teacache_extractor() -> None:
    """Register the TeaCache extractor for ``QwenImageTransformer2DModel`` with vllm-omni.

    The registered function dispatches by type: our transformer → :func:`extract_teacache_context`,
    anything else → the extractor vllm-omni had registered under that name. Idempotent: calling it
    again keeps the dispatcher in place (it never wraps itself).
    """
    current = teacache_extractors.EXTRACTOR_REGISTRY.get(TRANSFORMER_TYPE)
    if getattr(current, "fallback", None) is not None:
        return
    fallback = current if current is not None else _no_fallback
    teacache_extractors.register_extractor(TRANSFORMER_TYPE, _dispatching_extractor(fallback))


def _no_fallback(module: torch.nn.Module, *args: Any, **kwargs: Any) -> CacheContext:
    raise ValueError(f"no vllm-omni TeaCache extractor for {type(module).__module__}.{type(module).__qualname__}")
