"""vllm-omni's SDPA diffusion attention backend, dispatched for the CPU platform.

vllm-omni's ``AttentionImpl.forward`` picks ``forward_cuda`` / ``forward_hip`` / ... by platform and
raises for an out-of-tree one; on the CPU, SDPA runs exactly as its CUDA path does.
"""

from __future__ import annotations

import torch
from vllm_omni.diffusion.attention.backends.abstract import AttentionMetadata
from vllm_omni.diffusion.attention.backends.sdpa import SDPABackend, SDPAImpl


class CpuSDPAImpl(SDPAImpl):
    """SDPA with the mask layout of vllm-omni's CUDA path."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_metadata: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        """``torch.nn.functional.scaled_dot_product_attention`` on ``(B, S, H, D)`` tensors."""
        return self.forward_cuda(query, key, value, attn_metadata)


class CpuSDPABackend(SDPABackend):
    """vllm-omni's TORCH_SDPA backend whose implementation runs on the CPU platform."""

    @staticmethod
    def get_impl_cls() -> type[CpuSDPAImpl]:
        """The CPU-dispatching implementation."""
        return CpuSDPAImpl


# vllm-omni 0.27 attends float32 queries through its own SDPA backend whatever the platform chose
# (``Attention.sdpa_fallback``), and that implementation raises on an out-of-tree platform; it gets
# the CPU-dispatching one too. This module is imported only through the CPU platform.
SDPABackend.get_impl_cls = staticmethod(CpuSDPABackend.get_impl_cls)
