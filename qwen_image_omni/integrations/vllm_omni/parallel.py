"""Our transformer's attention through vllm-omni's ``Attention`` layer, and its sequence-parallel plan.

Inside vllm-omni, :func:`route_attention_through_vllm_omni` gives every block of our
:class:`~qwen_image_omni.QwenImageTransformer2DModel` an attention processor whose attention call
is vllm-omni's :class:`~vllm_omni.diffusion.attention.layer.Attention` instead of diffusers'
``dispatch_attention_fn``. Everything else of the processor (projections, q/k RMSNorm + RoPE through
``joint_qk_norm_rope``, output projections) is unchanged, so:

- the engine's ``attention_backend`` / per-role diffusion attention config picks the kernel, as for
  vllm-omni's own transformer;
- vllm-omni's sequence parallelism reaches us: the instance gets an ``_sp_plan`` (image tokens, image
  RoPE table and Edit-Plus ``modulate_index`` sharded over the SP group, the text stream replicated,
  the output gathered at ``proj_out``) and the Attention layer runs the Ulysses all-to-all / ring
  over it, with the text as the replicated "front" joint tensors, the layout vllm-omni's own
  Qwen-Image transformer uses.

Outside vllm-omni nothing changes: the class keeps diffusers' processor and no ``_sp_plan``; only an
instance built for vllm-omni (``build_transformer``) is rerouted. The extra modules hold no
parameters or buffers, so state-dict keys, weight loading, layerwise offload and HSDP are unaffected.

Tested on the full engine (CPU platform, ``tests/integrations/vllm_omni/test_offload.py``): single-rank images
equal the diffusers-attention ones; Ulysses over two ranks equals single rank, and with an odd image
token count (vllm-omni's auto-padding) equals vllm-omni's own transformer. Not tested: ring
attention (vllm-omni's ring kernel calls a CUDA-only op, for its own transformer too), Edit-Plus
``modulate_index`` sharding, ``mask_sp_padding=True``. ControlNet residuals (full-length image
tensors added after blocks) are not sharded, so ControlNet does not run under SP.

The layerwise-offload and HSDP declarations themselves (``_layerwise_offload_blocks_attrs``,
``_hsdp_shard_conditions``) are plain class attributes of the transformer and need nothing here.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from vllm.logger import init_logger
from vllm_omni.diffusion.attention.backends.abstract import AttentionMetadata
from vllm_omni.diffusion.attention.layer import Attention as OmniAttention
from vllm_omni.diffusion.distributed.sp_plan import SequenceParallelInput, SequenceParallelOutput
from vllm_omni.diffusion.forward_context import get_forward_context, is_forward_context_available

from ...models.transformer_qwenimage import QwenDoubleStreamAttnProcessor, QwenImageTransformer2DModel

# Under "vllm." so vllm's logging config (INFO, its format) applies; a bare name would drop INFO lines.
logger = init_logger(f"vllm.{__name__}")

__all__ = [
    "SP_PLAN",
    "VllmOmniDoubleStreamAttnProcessor",
    "route_attention_through_vllm_omni",
    "wants_vllm_omni_attention",
]

SP_PLAN = {
    # The image RoPE table shards with the image tokens (output 0; the text table, output 1, stays whole).
    "pos_embed": {0: SequenceParallelInput(split_dim=0, expected_dims=2, split_output=True, auto_pad=True)},
    # Image tokens enter block 0 sharded; every later block takes the previous one's shard.
    "transformer_blocks.0": {"hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, auto_pad=True)},
    # Edit-Plus (zero_cond_t): the per-token modulation index goes to every block whole; shard it each time.
    "transformer_blocks.*": {"modulate_index": SequenceParallelInput(split_dim=1, expected_dims=2, auto_pad=True)},
    "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
}
"""vllm-omni ``_sp_plan`` for our module tree (the text stream is never sharded: joint attention needs it whole)."""


def _sequence_parallel_size(od_config) -> int:
    """The engine's sequence-parallel size (1 when unset)."""
    parallel_config = getattr(od_config, "parallel_config", None)
    return int(getattr(parallel_config, "sequence_parallel_size", None) or 1)


class VllmOmniDoubleStreamAttnProcessor(QwenDoubleStreamAttnProcessor, nn.Module):
    """:class:`~qwen_image_omni.models.transformer_qwenimage.QwenDoubleStreamAttnProcessor` attending through vllm-omni's ``Attention``.

    An ``nn.Module`` so diffusers' ``Attention`` registers it (and the vllm-omni layer in it) as a
    child; neither holds parameters or buffers.
    """

    def __init__(self, attention: OmniAttention, *, sequence_parallel_size: int, mask_sp_padding: bool):
        nn.Module.__init__(self)
        self.attention = attention
        self.sequence_parallel_size = sequence_parallel_size
        self.mask_sp_padding = mask_sp_padding

    def _image_padding_mask(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """Keep-mask of the (globally padded) image tokens when SP auto-padding applied and is to be masked."""
        if not self.mask_sp_padding or not is_forward_context_available():
            return None
        context = get_forward_context()
        original, padding = context.sp_original_seq_len, context.sp_padding_size
        if original is None or not padding:
            return None
        mask = torch.ones(batch_size, original + padding, dtype=torch.bool, device=device)
        mask[:, original:] = False
        return mask

    def _attend(self, joint_query, joint_key, joint_value, text_mask, seq_txt):
        """vllm-omni's Attention over ``[text, image]``; under SP the image is sharded and the text replicated."""
        if self.sequence_parallel_size > 1:
            metadata = AttentionMetadata(
                joint_query=joint_query[:, :seq_txt],
                joint_key=joint_key[:, :seq_txt],
                joint_value=joint_value[:, :seq_txt],
                joint_strategy="front",
                joint_attn_mask=text_mask,
                attn_mask=self._image_padding_mask(joint_query.shape[0], joint_query.device),
            )
            return self.attention(
                joint_query[:, seq_txt:].contiguous(),
                joint_key[:, seq_txt:].contiguous(),
                joint_value[:, seq_txt:].contiguous(),
                metadata,
            )
        metadata = None
        if text_mask is not None:
            image_mask = text_mask.new_ones((joint_query.shape[0], joint_query.shape[1] - seq_txt))
            metadata = AttentionMetadata(attn_mask=torch.cat([text_mask, image_mask], dim=1))
        return self.attention(joint_query, joint_key, joint_value, metadata)


def wants_vllm_omni_attention(od_config) -> bool:
    """Whether an engine needs vllm-omni's ``Attention`` in our blocks: it names a diffusion attention
    backend (engine option or ``DIFFUSION_ATTENTION_BACKEND``) or runs sequence parallel.

    Otherwise our blocks keep their own SDPA attention, so a rollout engine gives the trainer's
    numbers exactly; vllm-omni's platform default backend (FlashAttention on a GPU) differs from
    them in the last bits.
    """
    config = getattr(od_config, "diffusion_attention_config", None)
    named = getattr(config, "default", None) is not None or bool(getattr(config, "per_role", None))
    return named or bool(os.environ.get("DIFFUSION_ATTENTION_BACKEND")) or _sequence_parallel_size(od_config) > 1


def route_attention_through_vllm_omni(transformer: QwenImageTransformer2DModel, od_config) -> None:
    """Make ``transformer`` (built for vllm-omni) attend through vllm-omni's ``Attention`` and carry its ``_sp_plan``.

    Call it while vllm-omni constructs the pipeline (``build_transformer``): vllm-omni's
    ``Attention`` resolves its backend from the current diffusion config at construction. The
    instance gets ``_sp_plan`` (class attribute untouched), which vllm-omni reads after the
    pipeline is built to install its sequence-parallel hooks.
    """
    sequence_parallel_size = _sequence_parallel_size(od_config)
    backend = None
    mask_sp_padding = bool(getattr(getattr(od_config, "parallel_config", None), "mask_sp_padding", False))
    for index, block in enumerate(transformer.transformer_blocks):
        attn = block.attn
        head_dim = attn.inner_dim // attn.heads
        attention = OmniAttention(
            num_heads=attn.heads,
            head_size=head_dim,
            causal=False,
            softmax_scale=attn.scale,
            prefix=f"transformer_blocks.{index}.attn",
        )
        attn.set_processor(
            VllmOmniDoubleStreamAttnProcessor(
                attention, sequence_parallel_size=sequence_parallel_size, mask_sp_padding=mask_sp_padding
            )
        )
        backend = attention.backend_pref
    transformer._sp_plan = SP_PLAN
    logger.info(
        "qwen-image-omni: %d transformer blocks attend through vllm-omni's Attention (backend %s, sequence "
        "parallel size %d)",
        len(transformer.transformer_blocks),
        backend,
        sequence_parallel_size,
    )
