"""qwen-image-omni: one Qwen-Image transformer for diffusers, vllm-omni and RL trainers.

The text RoPE length is taken from the width of ``encoder_hidden_states``, never from a
length argument, so padded prompts give the same numbers everywhere.
"""

from .models import QwenImageTransformer2DModel

__all__ = ["QwenImageTransformer2DModel"]
__version__ = "0.1.0"
