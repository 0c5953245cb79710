"""The models, one file per model as diffusers names them (``transformer_qwenimage.py``), each beside its RoPE."""

from .rope_qwenimage import QwenEmbedRope
from .transformer_qwenimage import QwenImageTransformer2DModel

__all__ = ["QwenEmbedRope", "QwenImageTransformer2DModel"]
