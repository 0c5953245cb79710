# Copyright 2025 Qwen-Image Team, The HuggingFace Team and the qwen-image-omni authors.
# Licensed under the Apache License, Version 2.0.
"""Qwen-Image transformer: a drop-in for diffusers' ``QwenImageTransformer2DModel``.

Same config, same state-dict keys, same outputs; the difference is where the text RoPE length
comes from. It is always ``encoder_hidden_states.shape[1]``, read inside ``forward``: there is no
length argument, so prompt embeddings padded wider than their valid tokens (fixed-width RL
collation, continuous-batching padding) get the same numbers as unpadded ones. Callers that still
pass vllm-omni's ``txt_seq_lens`` are accepted, warned once, and ignored.

Samples of one batch may also have different image shapes with the same token count (32x64 and
64x32 grids, Edit condition images of different grids): each then gets its own RoPE positions
(and Edit-Plus modulation index), where diffusers gives every sample sample 0's.

The q/k RMSNorm + RoPE + ``[text, image]`` concatenation of every block goes through
``qwen_image_omni.kernels.joint_qk_norm_rope``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, NamedTuple

import diffusers
import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import FromOriginalModelMixin, PeftAdapterMixin
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, RMSNorm
from diffusers.utils import apply_lora_scale
from diffusers.utils.torch_utils import maybe_allow_in_graph
from packaging.version import Version

from ..kernels import joint_qk_norm_rope
from .rope_qwenimage import QwenEmbedRope, normalize_img_shapes, unpack_per_sample

_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# diffusers' layerwise casting stores weights in one dtype and computes in another (its hook's name).
_LAYERWISE_CASTING_HOOK = "layerwise_casting"

# diffusers 0.39 moved the joint [text, image] mask into QwenDoubleStreamAttnProcessor2_0 (built from
# encoder_hidden_states_mask) and taught Ulysses attention to all-gather a rank-local mask. Before, the model
# passed the whole joint mask as `attention_mask` and Ulysses used a mask as it came.
_DIFFUSERS_MASK_IN_PROCESSOR = Version(diffusers.__version__).release >= (0, 39)

_TXT_SEQ_LENS_WARNED = False


def _warn_txt_seq_lens_ignored() -> None:
    global _TXT_SEQ_LENS_WARNED
    if _TXT_SEQ_LENS_WARNED or torch.compiler.is_compiling():
        return
    _TXT_SEQ_LENS_WARNED = True
    warnings.warn(
        "`txt_seq_lens` is ignored by qwen_image_omni.QwenImageTransformer2DModel: the text RoPE length is "
        "always encoder_hidden_states.shape[1] (as in diffusers). Stop passing it; it will be removed.",
        FutureWarning,
        stacklevel=3,
    )


class QwenTimestepProjEmbeddings(nn.Module):
    """Sinusoidal timestep projection + MLP, plus Qwen-Image-Layered's learned additional condition."""

    def __init__(self, embedding_dim: int, use_additional_t_cond: bool = False):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=embedding_dim)
        self.use_additional_t_cond = use_additional_t_cond
        if use_additional_t_cond:
            self.addition_t_embedding = nn.Embedding(2, embedding_dim)

    def forward(
        self, timestep: torch.Tensor, hidden_states: torch.Tensor, addition_t_cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the conditioning vector ``[N, embedding_dim]`` in ``hidden_states``' dtype."""
        conditioning = self.timestep_embedder(self.time_proj(timestep).to(dtype=hidden_states.dtype))
        if self.use_additional_t_cond:
            if addition_t_cond is None:
                raise ValueError("`additional_t_cond` is required when the model has use_additional_t_cond=True")
            conditioning = conditioning + self.addition_t_embedding(addition_t_cond).to(dtype=hidden_states.dtype)
        return conditioning


def _ring_degree(parallel_config) -> int:
    """The ring degree of a diffusers ``ParallelConfig`` (1 without context parallelism)."""
    cp_config = getattr(parallel_config, "context_parallel_config", None)
    return 1 if cp_config is None else cp_config.ring_degree


def _ulysses_degree(parallel_config) -> int:
    """The Ulysses degree of a diffusers ``ParallelConfig`` (1 without context parallelism)."""
    cp_config = getattr(parallel_config, "context_parallel_config", None)
    return 1 if cp_config is None else cp_config.ulysses_degree


def _gather_mask_over_ulysses(mask: torch.Tensor, parallel_config) -> torch.Tensor:
    """All-gather this rank's ``[B, 1, 1, S_local]`` mask along the sequence over the Ulysses group, in rank order.

    That is the key order of Ulysses attention after its all-to-all. The local lengths may differ
    (``ulysses_anything``): each part is padded to the longest for the gather and cut back after.
    """
    import torch.distributed._functional_collectives as funcol

    group = parallel_config.context_parallel_config._ulysses_mesh.get_group()
    local = torch.tensor([mask.shape[-1]], device=mask.device)
    sizes = funcol.wait_tensor(funcol.all_gather_tensor(local, gather_dim=0, group=group)).tolist()
    padded = torch.cat([mask, mask.new_zeros((*mask.shape[:-1], max(sizes) - mask.shape[-1]))], dim=-1)
    gathered = funcol.wait_tensor(funcol.all_gather_tensor(padded.contiguous(), gather_dim=mask.ndim - 1, group=group))
    parts = gathered.split(max(sizes), dim=-1)
    return torch.cat([part[..., :size] for part, size in zip(parts, sizes)], dim=-1)


def _gather_kv_and_mask(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, parallel_config) -> tuple:
    """All-gather ``key``/``value`` ``[B, S, H, D]`` (differentiably) and ``mask`` along the sequence over the CP mesh.

    The sequence comes back in rank order, each rank's ``[text, image]`` chunk in turn: the same
    order for keys, values and mask, which is all attention needs (RoPE is already applied).
    """
    import torch.distributed._functional_collectives as funcol

    group = parallel_config.context_parallel_config._flattened_mesh.get_group()
    key = funcol.all_gather_tensor_autograd(key.contiguous(), gather_dim=1, group=group)
    value = funcol.all_gather_tensor_autograd(value.contiguous(), gather_dim=1, group=group)
    mask = funcol.wait_tensor(funcol.all_gather_tensor(mask.contiguous(), gather_dim=mask.ndim - 1, group=group))
    return key, value, mask


def _norm_weight(norm: nn.Module | None, name: str) -> torch.Tensor | None:
    """The weight ``joint_qk_norm_rope`` takes for one of ``Attention``'s q/k norms (None: no norm)."""
    if norm is None:
        return None
    if not isinstance(norm, RMSNorm) or norm.weight is None or norm.bias is not None:
        raise ValueError(f"attn.{name} must be None or an affine RMSNorm without bias, got {norm!r}")
    return norm.weight


class QwenDoubleStreamAttnProcessor:
    """Joint attention over ``[text, image]`` tokens for Qwen-Image's double-stream blocks.

    Computes q/k/v of both streams, normalises and rotates q and k with one
    ``joint_qk_norm_rope`` call that writes them straight into the joint buffers, runs attention
    through diffusers' ``dispatch_attention_fn`` (so ``set_attention_backend`` and context
    parallelism work), and splits the result back into the two streams.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor requires `encoder_hidden_states` (the text stream)")
        if attention_mask is not None:
            raise ValueError(
                "QwenDoubleStreamAttnProcessor does not take `attention_mask`; pass `encoder_hidden_states_mask` "
                "and the processor builds the joint mask"
            )
        if image_rotary_emb is None:
            raise ValueError("QwenDoubleStreamAttnProcessor requires `image_rotary_emb` = (img_freqs, txt_freqs)")

        seq_txt = encoder_hidden_states.shape[1]
        # A fixed head_dim with -1 heads keeps this tensor-parallel agnostic (each rank holds heads // tp).
        head_dim = attn.inner_dim // attn.heads
        img_query = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        img_key = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_value = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))

        img_freqs, txt_freqs = image_rotary_emb
        eps = next((n.eps for n in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k) if n), 1e-6)
        joint_query, joint_key = joint_qk_norm_rope(
            img_query,
            img_key,
            txt_query,
            txt_key,
            img_q_weight=_norm_weight(attn.norm_q, "norm_q"),
            img_k_weight=_norm_weight(attn.norm_k, "norm_k"),
            txt_q_weight=_norm_weight(attn.norm_added_q, "norm_added_q"),
            txt_k_weight=_norm_weight(attn.norm_added_k, "norm_added_k"),
            img_freqs=img_freqs,
            txt_freqs=txt_freqs,
            eps=eps,
        )
        joint_value = torch.cat([txt_value, img_value], dim=1)

        joint_hidden_states = self._attend(joint_query, joint_key, joint_value, encoder_hidden_states_mask, seq_txt)
        joint_hidden_states = joint_hidden_states.flatten(2, 3).to(joint_query.dtype)

        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]
        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)  # dropout
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        return img_attn_output, txt_attn_output

    def _attend(
        self,
        joint_query: torch.Tensor,
        joint_key: torch.Tensor,
        joint_value: torch.Tensor,
        text_mask: torch.Tensor | None,
        seq_txt: int,
    ) -> torch.Tensor:
        """Attention over the ``[text, image]`` tokens ``[B, S, H, D]`` (text first, ``seq_txt`` of them).

        ``text_mask`` is the ``[B, seq_txt]`` keep-mask of the text tokens (None: all valid); image
        tokens are always valid. Returns ``[B, S, H, D]``. Serving engines override this method to
        run their own attention layer.
        """
        attention_mask = None
        if text_mask is not None:
            attention_mask = _joint_attention_mask(text_mask, joint_query.shape[1] - seq_txt)

        parallel_config = self._parallel_config
        if attention_mask is not None and _ring_degree(parallel_config) > 1:
            # diffusers' ring attention applies this rank's mask to every KV chunk it rotates in (wrong
            # numbers); gather K, V and the mask instead, as its all-gather ring does, and attend locally.
            joint_key, joint_value, attention_mask = _gather_kv_and_mask(
                joint_key, joint_value, attention_mask, parallel_config
            )
            parallel_config = None
        elif attention_mask is not None and _ulysses_degree(parallel_config) > 1 and not _DIFFUSERS_MASK_IN_PROCESSOR:
            # diffusers < 0.39's Ulysses attention does not gather a rank-local mask (a shape error): gather it.
            attention_mask = _gather_mask_over_ulysses(attention_mask, parallel_config)
        return dispatch_attention_fn(
            joint_query,
            joint_key,
            joint_value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=parallel_config,
        )


def _joint_attention_mask(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """The ``[B, 1, 1, text + image]`` keep-mask of joint attention from the ``[B, text]`` text mask."""
    image_mask = text_mask.new_ones((text_mask.shape[0], image_tokens))
    return torch.cat([text_mask, image_mask], dim=1)[:, None, None, :]


def modulate(
    x: torch.Tensor, mod_params: torch.Tensor, modulate_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaLN modulation ``x * (1 + scale) + shift``; returns it and the gate.

    ``mod_params`` ``(B, 3 * dim)`` is one half of a block's ``img_mod`` / ``txt_mod`` output: shift,
    scale and gate. The blocks modulate their normalised streams with it, and so does vllm-omni's
    TeaCache extractor (block 0's modulated image stream is what it compares between steps).
    With ``modulate_index`` (Edit-Plus ``zero_cond_t``) ``mod_params`` holds ``2B`` rows: the first
    ``B`` (real timestep) modulate tokens whose index is 0, the last ``B`` (timestep 0) the others.
    """
    shift, scale, gate = mod_params.chunk(3, dim=-1)
    if modulate_index is None:
        shift, scale, gate = shift.unsqueeze(1), scale.unsqueeze(1), gate.unsqueeze(1)
    else:
        is_target = (modulate_index == 0).unsqueeze(-1)

        def select(params: torch.Tensor) -> torch.Tensor:
            target, condition = params.chunk(2, dim=0)
            return torch.where(is_target, target.unsqueeze(1), condition.unsqueeze(1))

        shift, scale, gate = select(shift), select(scale), select(gate)
    return x * (1 + scale) + shift, gate


@maybe_allow_in_graph
class QwenImageTransformerBlock(nn.Module):
    """One double-stream (MMDiT) block: AdaLN-modulated joint attention and a GELU MLP per stream."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        qk_norm: str = "rms_norm",
        eps: float = 1e-6,
        zero_cond_t: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.num_attention_heads = num_attention_heads
        self.attention_head_dim = attention_head_dim
        self.zero_cond_t = zero_cond_t

        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = Attention(
            query_dim=dim,
            cross_attention_dim=None,
            added_kv_proj_dim=dim,
            dim_head=attention_head_dim,
            heads=num_attention_heads,
            out_dim=dim,
            context_pre_only=False,
            bias=True,
            processor=QwenDoubleStreamAttnProcessor(),
            qk_norm=qk_norm,
            eps=eps,
        )
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_mlp = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_mlp = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        modulate_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(encoder_hidden_states, hidden_states)`` after one block (diffusers' order)."""
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
        if self.zero_cond_t:
            temb = temb.chunk(2, dim=0)[0]
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)

        img_modulated, img_gate1 = modulate(self.img_norm1(hidden_states), img_mod1, modulate_index)
        txt_modulated, txt_gate1 = modulate(self.txt_norm1(encoder_hidden_states), txt_mod1)
        joint_attention_kwargs = joint_attention_kwargs or {}
        if (
            encoder_hidden_states_mask is not None
            and not _DIFFUSERS_MASK_IN_PROCESSOR
            and not isinstance(self.attn.processor, QwenDoubleStreamAttnProcessor)
        ):
            # A processor of diffusers < 0.39 ignores encoder_hidden_states_mask: give it the joint mask as
            # `attention_mask`, as that version's model does.
            joint_mask = _joint_attention_mask(encoder_hidden_states_mask, hidden_states.shape[1])
            joint_attention_kwargs = {**joint_attention_kwargs, "attention_mask": joint_mask}
            encoder_hidden_states_mask = None
        img_attn_output, txt_attn_output = self.attn(
            hidden_states=img_modulated,
            encoder_hidden_states=txt_modulated,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            image_rotary_emb=image_rotary_emb,
            **joint_attention_kwargs,
        )
        hidden_states = hidden_states + img_gate1 * img_attn_output
        encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn_output

        img_modulated2, img_gate2 = modulate(self.img_norm2(hidden_states), img_mod2, modulate_index)
        hidden_states = hidden_states + img_gate2 * self.img_mlp(img_modulated2)
        txt_modulated2, txt_gate2 = modulate(self.txt_norm2(encoder_hidden_states), txt_mod2)
        encoder_hidden_states = encoder_hidden_states + txt_gate2 * self.txt_mlp(txt_modulated2)

        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


def _is_transformer_block(name: str, module: nn.Module) -> bool:
    """Whether ``module`` is one double-stream block (vllm-omni's HSDP shards each block as one unit)."""
    return isinstance(module, QwenImageTransformerBlock)


class BlockInputs(NamedTuple):
    """What the blocks take, as :meth:`QwenImageTransformer2DModel.prepare_blocks` builds it.

    ``hidden_states`` ``(B, S, dim)`` and ``encoder_hidden_states`` ``(B, L, dim)`` are the embedded
    image and text streams; ``temb`` the timestep embedding (``2B`` rows with Edit-Plus
    ``zero_cond_t``); ``image_rotary_emb`` the RoPE tables of the image and the text width
    (``[S, D/2]`` shared by the batch, or ``[B, S, D/2]`` when the samples' image shapes differ);
    ``encoder_hidden_states_mask`` the boolean text mask (None: all valid); ``modulate_index`` the
    per-token target/condition index of ``zero_cond_t`` (else None); ``attention_kwargs`` and
    ``controlnet_block_samples`` as :meth:`QwenImageTransformer2DModel.forward` took them.
    """

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor
    encoder_hidden_states_mask: torch.Tensor | None
    temb: torch.Tensor
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor]
    attention_kwargs: dict[str, Any] | None
    modulate_index: torch.Tensor | None
    controlnet_block_samples: list[torch.Tensor] | None


def _check_config(*, out_channels, axes_dims_rope, num_layers, attention_head_dim, **sizes) -> None:
    """Constructor checks, so a bad config fails here, naming its key, not at the first forward."""

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for name, value in sizes.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if not is_int(attention_head_dim) or attention_head_dim < 2 or attention_head_dim % 2:
        raise ValueError(
            f"`attention_head_dim` must be a positive even int (RoPE rotates pairs), got {attention_head_dim!r}"
        )
    if not is_int(num_layers) or num_layers < 0:
        raise ValueError(f"`num_layers` must be an int >= 0, got {num_layers!r}")
    if out_channels is not None and (not is_int(out_channels) or out_channels < 1):
        raise ValueError(f"`out_channels` must be a positive int or None (= in_channels), got {out_channels!r}")
    axes = tuple(axes_dims_rope) if isinstance(axes_dims_rope, (list, tuple)) else None
    if axes is None or len(axes) != 3 or not all(is_int(d) and d > 0 and d % 2 == 0 for d in axes):
        raise ValueError(
            f"`axes_dims_rope` must be 3 positive even ints (frame, height, width rotary dims), got {axes_dims_rope!r}"
        )
    if sum(axes) != attention_head_dim:
        raise ValueError(f"`axes_dims_rope` must sum to attention_head_dim={attention_head_dim}, got {axes}")


def _compute_dtype(linear: nn.Module, device: torch.device) -> torch.dtype | None:
    """The dtype ``linear`` multiplies in, or None when that is not known before it runs.

    None under autocast (it casts the input) and for quantized weights (integer storage); the
    compute dtype of diffusers' layerwise casting when it is enabled.
    """
    if torch.is_autocast_enabled(device.type):
        return None
    registry = getattr(linear, "_diffusers_hook", None)
    hook = registry.get_hook(_LAYERWISE_CASTING_HOOK) if registry is not None else None
    if hook is not None:
        return hook.compute_dtype
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        return None
    return weight.dtype


def _timestep_tensor(timestep: object, hidden_states: torch.Tensor) -> torch.Tensor:
    """``timestep`` as a tensor; a Python number is accepted as one value for the whole batch."""
    if timestep is None:
        raise ValueError("`timestep` is required: a tensor of 1 or batch values in [0, 1]")
    if isinstance(timestep, torch.Tensor):
        if timestep.dtype == torch.bool or timestep.dtype.is_complex:
            raise TypeError(f"`timestep` must be a real-valued tensor, got {timestep.dtype}")
        return timestep
    if isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
        return torch.tensor([float(timestep)], device=hidden_states.device)
    raise TypeError(f"`timestep` must be a torch.Tensor or a number, got {type(timestep).__name__}")


def _check_cp_split(parallel_config, text_width: int, image_tokens: int) -> None:
    """Equal-split context parallelism cuts the text and the image tokens into one part per CP rank."""
    cp_config = getattr(parallel_config, "context_parallel_config", None)
    if cp_config is None or getattr(cp_config, "ulysses_anything", False) or getattr(cp_config, "ring_anything", False):
        return
    ranks = cp_config.ring_degree * cp_config.ulysses_degree
    if text_width % ranks:
        raise ValueError(
            f"context parallelism over {ranks} ranks needs the text width (encoder_hidden_states.shape[1]) to be "
            f"divisible by {ranks}, got {text_width}: pad the prompt embeddings and mask the padding"
        )
    if image_tokens % ranks:
        raise ValueError(
            f"context parallelism over {ranks} ranks needs the image tokens (hidden_states.shape[1]) to be "
            f"divisible by {ranks}, got {image_tokens}; or use ContextParallelConfig(ulysses_anything=True)"
        )


def _check_activation(name: str, value: object, shape_text: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape {shape_text}, got {type(value).__name__}")
    if value.dtype not in _ACTIVATION_DTYPES:
        raise ValueError(f"`{name}` must be float32, float16 or bfloat16, got {value.dtype}")
    return value


class QwenImageTransformer2DModel(
    ModelMixin, ConfigMixin, PeftAdapterMixin, FromOriginalModelMixin, CacheMixin, AttentionMixin
):
    """The Qwen-Image double-stream diffusion transformer, a drop-in for diffusers' class of the same name.

    Loads and saves diffusers checkpoints unchanged (same config and state-dict keys). The text
    RoPE length is ``encoder_hidden_states.shape[1]``, never a separate argument.

    Args:
        patch_size (`int`, defaults to 2): patch size of the latent grid.
        in_channels (`int`, defaults to 64): channels of the packed latent tokens.
        out_channels (`int`, *optional*, defaults to 16): output channels per patch pixel (``in_channels`` if None).
        num_layers (`int`, defaults to 60): number of double-stream blocks.
        attention_head_dim (`int`, defaults to 128): dimension of each attention head.
        num_attention_heads (`int`, defaults to 24): number of attention heads.
        joint_attention_dim (`int`, defaults to 3584): channel dimension of ``encoder_hidden_states``.
        guidance_embeds (`bool`, defaults to False): kept for config compatibility; Qwen-Image has no guidance embedding.
        axes_dims_rope (`tuple[int]`, defaults to (16, 56, 56)): rotary dimensions of the frame/height/width axes.
        zero_cond_t (`bool`, defaults to False): Edit-Plus 2511: condition-image tokens are modulated with timestep 0.
        use_additional_t_cond (`bool`, defaults to False): Layered: add a learned embedding of ``additional_t_cond``.
        use_layer3d_rope (`bool`, defaults to False): Layered: 3-D RoPE with the condition image at frame -1.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["QwenImageTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _repeated_blocks = ["QwenImageTransformerBlock"]
    # vllm-omni reads these two (diffusers ignores them): the block list its layerwise offload streams,
    # and the modules its HSDP wraps with FSDP2 one by one (the root takes the rest).
    _layerwise_offload_blocks_attrs = ["transformer_blocks"]
    _hsdp_shard_conditions = [_is_transformer_block]
    _cp_plan = {
        "transformer_blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        },
        "transformer_blocks.*": {
            "modulate_index": ContextParallelInput(split_dim=1, expected_dims=2, split_output=False),
            "encoder_hidden_states_mask": ContextParallelInput(split_dim=1, expected_dims=2, split_output=False),
        },
        "pos_embed": {
            0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    _tp_plan = {
        "transformer_blocks.*.attn.to_q": "colwise",
        "transformer_blocks.*.attn.to_k": "colwise",
        "transformer_blocks.*.attn.to_v": "colwise",
        "transformer_blocks.*.attn.to_out.0": "rowwise",
        "transformer_blocks.*.attn.add_q_proj": "colwise",
        "transformer_blocks.*.attn.add_k_proj": "colwise",
        "transformer_blocks.*.attn.add_v_proj": "colwise",
        "transformer_blocks.*.attn.to_add_out": "rowwise",
        "transformer_blocks.*.img_mlp.net.0.proj": "colwise",
        "transformer_blocks.*.img_mlp.net.2": "rowwise",
        "transformer_blocks.*.txt_mlp.net.0.proj": "colwise",
        "transformer_blocks.*.txt_mlp.net.2": "rowwise",
    }

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
    ):
        super().__init__()
        _check_config(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            axes_dims_rope=axes_dims_rope,
        )
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim

        self.pos_embed = QwenEmbedRope(theta=10000, axes_dim=axes_dims_rope, scale_rope=True, layer3d=use_layer3d_rope)
        self.time_text_embed = QwenTimestepProjEmbeddings(self.inner_dim, use_additional_t_cond=use_additional_t_cond)
        self.txt_norm = RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(in_channels, self.inner_dim)
        self.txt_in = nn.Linear(joint_attention_dim, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                QwenImageTransformerBlock(
                    dim=self.inner_dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    zero_cond_t=zero_cond_t,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels, bias=True)

        self.gradient_checkpointing = False
        self.zero_cond_t = zero_cond_t

    def _text_attention_mask(
        self, encoder_hidden_states_mask: torch.Tensor | None, batch_size: int, text_width: int
    ) -> torch.Tensor | None:
        """Check the text mask and return it as bool, or None when every token is valid (SDPA fast path)."""
        mask = encoder_hidden_states_mask
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"`encoder_hidden_states_mask` must be a torch.Tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != (batch_size, text_width):
            raise ValueError(
                f"`encoder_hidden_states_mask` must have shape (batch, text_width)=({batch_size}, {text_width}) "
                f"to match encoder_hidden_states, got {tuple(mask.shape)}"
            )
        if mask.dtype.is_complex:
            raise TypeError(f"`encoder_hidden_states_mask` must be bool, integer or float, got {mask.dtype}")
        if mask.dtype != torch.bool and not torch.compiler.is_compiling():
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(
                    "`encoder_hidden_states_mask` must hold 1 for valid and 0 for padding tokens, got other values "
                    f"(e.g. {mask[(mask != 0) & (mask != 1)][0].item()}); an additive 0/-inf mask or a -1 padding "
                    "marker is not a keep-mask"
                )
        if mask.dtype != torch.bool:
            mask = mask != 0
        if not torch.compiler.is_compiling() and bool(mask.all()):
            return None
        return mask

    def _check_inputs(self, hidden_states, encoder_hidden_states, timestep, img_shapes) -> list[tuple]:
        """Validate the inputs up front; return the image shapes of the batch (see :meth:`_batch_img_shapes`).

        Timestep values (flow-matching time in [0, 1]) are checked in eager mode only: the check
        reads the tensor, which would break a compiled graph.
        """
        _check_activation("hidden_states", hidden_states, "(batch, image_tokens, in_channels)")
        if encoder_hidden_states is None:
            raise ValueError("`encoder_hidden_states` is required: (batch, text_width, joint_attention_dim), got None")
        _check_activation("encoder_hidden_states", encoder_hidden_states, "(batch, text_width, joint_attention_dim)")
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"`hidden_states` must have shape (batch, image_tokens, in_channels={self.config.in_channels}), "
                f"got {tuple(hidden_states.shape)}"
            )
        joint_dim = self.config.joint_attention_dim
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != joint_dim:
            raise ValueError(
                f"`encoder_hidden_states` must have shape (batch, text_width, joint_attention_dim={joint_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        batch_size, image_tokens = hidden_states.shape[:2]
        if encoder_hidden_states.shape[0] != batch_size:
            raise ValueError(
                f"`encoder_hidden_states` batch must equal hidden_states batch={batch_size}, "
                f"got {encoder_hidden_states.shape[0]}"
            )
        compute_dtype = _compute_dtype(self.img_in, hidden_states.device)
        if compute_dtype is not None and compute_dtype not in _ACTIVATION_DTYPES:
            raise ValueError(
                f"the model computes in {compute_dtype}; QwenImageTransformer2DModel runs in float32, float16 or "
                "bfloat16 (e.g. model.to(torch.float32))"
            )
        if compute_dtype is not None and hidden_states.dtype != compute_dtype:
            raise ValueError(
                f"`hidden_states` must have the model's dtype {compute_dtype} (img_in computes in it), got "
                f"{hidden_states.dtype}; cast the latents or run under torch.autocast"
            )
        if timestep.ndim > 1 or timestep.numel() not in (1, batch_size):
            raise ValueError(
                f"`timestep` must hold 1 or batch={batch_size} values (shape (1,) or ({batch_size},)), "
                f"got shape {tuple(timestep.shape)}"
            )
        if not torch.compiler.is_compiling() and not bool(((timestep >= 0) & (timestep <= 1)).all()):
            raise ValueError(
                "`timestep` must be flow-matching time in [0, 1] (diffusers' pipelines pass scheduler.timesteps / "
                f"1000), got values from {timestep.min().item()} to {timestep.max().item()}"
            )
        return self._batch_img_shapes(normalize_img_shapes(img_shapes), batch_size, image_tokens)

    @staticmethod
    def _batch_img_shapes(samples: list, batch_size: int, image_tokens: int) -> list[tuple]:
        """The image shapes of the batch: ``[shapes]`` when every sample has them, else one entry per row.

        When all entries of ``img_shapes`` agree, the list may have any length, as diffusers reads it
        (its pipelines list one entry per prompt for prompts x ``num_images_per_prompt`` rows). When
        they differ, diffusers gives every row sample 0's RoPE positions; here each row gets its own,
        which takes one entry per row. Every sample must cover ``hidden_states.shape[1]`` tokens.
        """
        shapes = tuple(samples[0])
        if all(tuple(sample) == shapes for sample in samples[1:]):
            tokens = sum(math.prod(fhw) for fhw in shapes)
            if tokens != image_tokens:
                raise ValueError(
                    f"`img_shapes` {list(shapes)} covers {tokens} image tokens per sample, but hidden_states has "
                    f"{image_tokens} (hidden_states.shape[1])"
                )
            return [shapes]
        if len(samples) != batch_size:
            raise ValueError(
                f"`img_shapes` lists {len(samples)} samples whose shapes differ, but hidden_states has batch "
                f"{batch_size}: samples with different image shapes need one `img_shapes` entry per row"
            )
        for i, sample in enumerate(samples):
            tokens = sum(math.prod(fhw) for fhw in sample)
            if tokens != image_tokens:
                raise ValueError(
                    f"`img_shapes` sample {i} {list(sample)} covers {tokens} image tokens, but hidden_states has "
                    f"{image_tokens} per sample (hidden_states.shape[1]): the samples of a batch may have "
                    "different image shapes, not different token counts"
                )
        return [tuple(sample) for sample in samples]

    def _check_additional_t_cond(self, additional_t_cond, batch_size: int) -> torch.Tensor | None:
        """Layered's per-sample 0/1 condition: required with ``use_additional_t_cond``, refused without it."""
        if not self.config.use_additional_t_cond:
            if additional_t_cond is not None:
                raise ValueError(
                    "`additional_t_cond` was given, but this model has use_additional_t_cond=False (only "
                    "Qwen-Image-Layered takes it); pass None"
                )
            return None
        if additional_t_cond is None:
            raise ValueError("`additional_t_cond` is required when the model has use_additional_t_cond=True")
        if not isinstance(additional_t_cond, torch.Tensor):
            raise TypeError(
                f"`additional_t_cond` must be an integer torch.Tensor of 1 or batch={batch_size} values, "
                f"got {type(additional_t_cond).__name__}"
            )
        if (
            additional_t_cond.dtype.is_floating_point
            or additional_t_cond.dtype.is_complex
            or (additional_t_cond.dtype == torch.bool)
        ):
            raise TypeError(f"`additional_t_cond` must be an integer tensor (0 or 1), got {additional_t_cond.dtype}")
        if additional_t_cond.ndim != 1 or additional_t_cond.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`additional_t_cond` must have shape (1,) or (batch={batch_size},), "
                f"got {tuple(additional_t_cond.shape)}"
            )
        if not torch.compiler.is_compiling() and not bool(((additional_t_cond == 0) | (additional_t_cond == 1)).all()):
            raise ValueError(f"`additional_t_cond` values must be 0 or 1, got {additional_t_cond.tolist()}")
        return additional_t_cond

    def _check_controlnet_block_samples(self, samples, batch_size: int, image_tokens: int) -> None:
        """ControlNet residuals: a non-empty list of ``(batch or 1, image_tokens, inner_dim)`` tensors."""
        if samples is None:
            return
        if not isinstance(samples, (list, tuple)) or len(samples) == 0:
            raise ValueError(
                "`controlnet_block_samples` must be None or a non-empty list of residuals, one per ControlNet "
                f"block, got {samples!r}"
            )
        expected = (batch_size, image_tokens, self.inner_dim)
        for i, sample in enumerate(samples):
            if not isinstance(sample, torch.Tensor):
                raise TypeError(f"`controlnet_block_samples[{i}]` must be a torch.Tensor, got {type(sample).__name__}")
            if sample.ndim != 3 or sample.shape[0] not in (1, batch_size) or tuple(sample.shape[1:]) != expected[1:]:
                raise ValueError(
                    f"`controlnet_block_samples[{i}]` must have shape (batch={batch_size} or 1, "
                    f"image_tokens={image_tokens}, inner_dim={self.inner_dim}), got {tuple(sample.shape)}"
                )

    @staticmethod
    def _modulate_index(
        batch_shapes: list[tuple], batch_size: int, image_tokens: int, device: torch.device
    ) -> torch.Tensor:
        """Per-token 0 (target image) / 1 (condition images) for Edit-Plus ``zero_cond_t``, shape (batch, tokens).

        The target is each row's first ``img_shapes`` entry; one row serves the whole batch when the
        rows' targets have one token count.
        """
        positions = torch.arange(image_tokens, device=device)
        targets = [math.prod(shapes[0]) for shapes in batch_shapes]
        if all(tokens == targets[0] for tokens in targets[1:]):
            return (positions >= targets[0]).to(torch.int).expand(batch_size, image_tokens)
        return torch.stack([positions >= tokens for tokens in targets]).to(torch.int)

    def _rotary_tables(
        self, batch_shapes: list[tuple], batch_size: int, text_width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(img_freqs, txt_freqs)``: ``[S, D/2]`` tables when the batch shares one layout, else ``[B, S, D/2]``.

        Per-row tables come out of ``pos_embed``'s forward too (``per_sample=True``), sequence-major,
        so that the parallel plans splitting its outputs along dim 0 (``_cp_plan`` here, vllm-omni's
        ``_sp_plan``) cut them with the tokens; they are unpacked to ``[B, S_local, D/2]`` here.
        """
        if len(batch_shapes) == 1:
            return self.pos_embed([list(batch_shapes[0])], max_txt_seq_len=text_width, device=device)
        self._check_processors_take_per_sample_tables()
        img_freqs, txt_freqs = self.pos_embed(
            [list(shapes) for shapes in batch_shapes], max_txt_seq_len=text_width, device=device, per_sample=True
        )
        return unpack_per_sample(img_freqs, batch_size), unpack_per_sample(txt_freqs, batch_size)

    def _check_processors_take_per_sample_tables(self) -> None:
        """Per-sample ``[B, S, D/2]`` tables need our processor; diffusers' applies a table to every sample."""
        for index, block in enumerate(self.transformer_blocks):
            processor = block.attn.processor
            if not isinstance(processor, QwenDoubleStreamAttnProcessor):
                raise ValueError(
                    "`img_shapes` differ between the samples of this batch, which takes per-sample RoPE tables; "
                    f"transformer_blocks.{index} attends with {type(processor).__name__}, which applies one table "
                    "to every sample: use QwenDoubleStreamAttnProcessor (model.set_attn_processor) or run samples "
                    "with different image shapes in separate batches"
                )

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor = None,
        img_shapes: list | None = None,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: list[torch.Tensor] | None = None,
        additional_t_cond: torch.Tensor | None = None,
        return_dict: bool = True,
        **legacy_kwargs: Any,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """Denoise one step.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch, image_tokens, in_channels)`): packed latent tokens.
            encoder_hidden_states (`torch.Tensor` of shape `(batch, text_width, joint_attention_dim)`): prompt
                embeddings. Their width is the text RoPE length; padding columns are fine when masked.
            encoder_hidden_states_mask (`torch.Tensor` of shape `(batch, text_width)`, *optional*): 1/True for
                valid tokens, 0/False for padding; bool, integer or 0/1 float; any pattern (right, left, holes).
            timestep (`torch.Tensor` of shape `(batch,)` or `(1,)`): flow-matching time in [0, 1].
            img_shapes (`list`): per sample, a list of `(frame, height, width)` latent grids (Edit: several). Samples
                may differ (same token count; then one entry per row): each gets its own RoPE positions.
            guidance: must be None (Qwen-Image has no guidance embedding; present for signature compatibility).
            attention_kwargs (`dict`, *optional*): passed to the attention processor; `scale` sets the LoRA scale.
            controlnet_block_samples (*optional*): ControlNet residuals added to the image stream after blocks.
            additional_t_cond (`torch.Tensor`, *optional*): Layered's additional condition (0/1 per sample).
            return_dict (`bool`, defaults to True): return a `Transformer2DModelOutput` instead of a tuple.
            **legacy_kwargs: only `txt_seq_lens`, the deprecated vllm-omni argument: accepted, ignored, warned
                once (FutureWarning). It is not a named parameter so that diffusers' modular pipelines, which pass
                every field the forward signature names, do not send it.

        Returns:
            `Transformer2DModelOutput` with `sample` of shape `(batch, image_tokens, patch_size**2 * out_channels)`,
            or a 1-tuple when `return_dict=False`.
        """
        blocks = self.prepare_blocks(
            hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes, guidance,
            attention_kwargs, controlnet_block_samples, additional_t_cond, **legacy_kwargs,
        )  # fmt: skip
        hidden_states, _ = self.run_blocks(blocks)
        return self.output_head(hidden_states, blocks, return_dict)

    # -- forward, split in three ----------------------------------------------------------------------
    # forward() is prepare_blocks -> run_blocks -> output_head. Callers that need the parts (vllm-omni's
    # TeaCache runs or skips the blocks per step) call them in this order with forward's arguments.

    def prepare_blocks(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor = None,
        img_shapes: list | None = None,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: list[torch.Tensor] | None = None,
        additional_t_cond: torch.Tensor | None = None,
        **legacy_kwargs: Any,
    ) -> BlockInputs:
        """First part of :meth:`forward`: check the inputs, embed them, build the RoPE tables.

        Takes :meth:`forward`'s arguments (all but ``return_dict``) and checks them as it does; the
        text RoPE length is the width of ``encoder_hidden_states``. ``attention_kwargs`` goes to the
        blocks as given: :meth:`forward` takes a LoRA ``scale`` out of it and applies it around the
        three parts; called alone, they apply none.

        Returns:
            :class:`BlockInputs`, the input of :meth:`run_blocks` and :meth:`output_head`.

        Raises:
            ValueError, TypeError: invalid inputs, as :meth:`forward` raises them.
        """
        if legacy_kwargs.pop("txt_seq_lens", None) is not None:
            _warn_txt_seq_lens_ignored()
        if legacy_kwargs:
            raise TypeError(f"forward() got unexpected keyword arguments: {', '.join(sorted(legacy_kwargs))}")
        if guidance is not None:
            raise ValueError(
                "`guidance` must be None: Qwen-Image transformers have no guidance embedding "
                "(use true CFG in the pipeline instead)"
            )
        timestep = _timestep_tensor(timestep, hidden_states)
        batch_shapes = self._check_inputs(hidden_states, encoder_hidden_states, timestep, img_shapes)
        batch_size, image_tokens = hidden_states.shape[:2]
        text_width = encoder_hidden_states.shape[1]  # the text RoPE length: the tensor's own width
        encoder_hidden_states_mask = self._text_attention_mask(encoder_hidden_states_mask, batch_size, text_width)
        _check_cp_split(self._parallel_config, text_width, image_tokens)
        additional_t_cond = self._check_additional_t_cond(additional_t_cond, batch_size)
        self._check_controlnet_block_samples(controlnet_block_samples, batch_size, image_tokens)
        if encoder_hidden_states_mask is not None:
            # Padding columns never reach a valid output through attention, except as 0 * value: NaN or
            # Inf there (a collation into torch.empty) would poison every token. Zero them; finite
            # padding gives the same bits either way.
            encoder_hidden_states = encoder_hidden_states.masked_fill(~encoder_hidden_states_mask.unsqueeze(-1), 0)

        # Linear's 3-D output is a view of its 2-D result. Regional torch.compile with dynamic shapes
        # guards on an input's view base, so block 0 (a view) and the others (not views) would compile
        # twice; a copy of the block inputs (tiny next to the blocks) keeps one graph for all blocks.
        hidden_states = self.img_in(hidden_states).clone()
        timestep = timestep.reshape(-1).to(hidden_states.dtype)
        if self.zero_cond_t:
            if additional_t_cond is not None:  # one condition per conditioning row, both halves
                timestep = timestep.expand(batch_size)
                additional_t_cond = additional_t_cond.expand(batch_size).repeat(2)
            timestep = torch.cat([timestep, timestep * 0], dim=0)
            modulate_index = self._modulate_index(batch_shapes, batch_size, image_tokens, hidden_states.device)
        else:
            modulate_index = None

        encoder_hidden_states = self.txt_in(self.txt_norm(encoder_hidden_states)).clone()
        temb = self.time_text_embed(timestep, hidden_states, additional_t_cond)
        image_rotary_emb = self._rotary_tables(batch_shapes, batch_size, text_width, hidden_states.device)
        return BlockInputs(
            hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb,
            attention_kwargs, modulate_index, controlnet_block_samples,
        )  # fmt: skip

    def run_blocks(self, blocks: BlockInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Second part of :meth:`forward`: every block (and the ControlNet residuals) on :meth:`prepare_blocks`' output.

        Returns:
            ``(image stream (B, S, dim), text stream (B, L, dim))`` after the last block; the image
            stream goes to :meth:`output_head`.
        """
        hidden_states, encoder_hidden_states = blocks.hidden_states, blocks.encoder_hidden_states
        controlnet_block_samples = blocks.controlnet_block_samples
        for index_block, block in enumerate(self.transformer_blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block,
                    hidden_states,
                    encoder_hidden_states,
                    blocks.encoder_hidden_states_mask,
                    blocks.temb,
                    blocks.image_rotary_emb,
                    blocks.attention_kwargs,
                    blocks.modulate_index,
                )
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_hidden_states_mask=blocks.encoder_hidden_states_mask,
                    temb=blocks.temb,
                    image_rotary_emb=blocks.image_rotary_emb,
                    joint_attention_kwargs=blocks.attention_kwargs,
                    modulate_index=blocks.modulate_index,
                )
            if controlnet_block_samples is not None:
                interval = math.ceil(len(self.transformer_blocks) / len(controlnet_block_samples))
                hidden_states = hidden_states + controlnet_block_samples[index_block // interval]
        return hidden_states, encoder_hidden_states

    def output_head(
        self, hidden_states: torch.Tensor, blocks: BlockInputs, return_dict: bool = True
    ) -> tuple[torch.Tensor] | Transformer2DModelOutput:
        """Last part of :meth:`forward`: ``norm_out`` and ``proj_out`` on the image stream.

        Args:
            hidden_states: the image stream ``(B, S, dim)`` from :meth:`run_blocks`.
            blocks: what :meth:`prepare_blocks` returned for this forward (its ``temb``).
            return_dict: as :meth:`forward`'s.

        Returns:
            What :meth:`forward` returns.
        """
        temb = blocks.temb.chunk(2, dim=0)[0] if self.zero_cond_t else blocks.temb
        output = self.proj_out(self.norm_out(hidden_states, temb))
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
