"""Fused q/k RMSNorm + RoPE + joint ``[text, image]`` concatenation.

``joint_qk_norm_rope`` replaces this part of diffusers' ``QwenDoubleStreamAttnProcessor2_0``::

    img_q, img_k, txt_q, txt_k = norm_q(img_q), norm_k(img_k), norm_added_q(txt_q), norm_added_k(txt_k)
    img_q, img_k = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False), ...  (and txt_q, txt_k with txt_freqs)
    joint_q, joint_k = torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1)

Modules: ``qk_norm_rope`` (the public op: argument checks and backend choice), ``reference`` (the
functional definition the backends are tested against), ``torch_backend`` and ``triton_backend``.
"""

from .qk_norm_rope import BACKEND_ENV_VAR, BACKENDS, joint_qk_norm_rope
from .reference import joint_qk_norm_rope_reference

__all__ = ["BACKEND_ENV_VAR", "BACKENDS", "joint_qk_norm_rope", "joint_qk_norm_rope_reference"]
