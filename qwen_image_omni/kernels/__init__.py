"""Fused q/k RMSNorm + RoPE: the joint ``[text, image]`` layout (Qwen-Image 1.x) and one stream (2.1).

``joint_qk_norm_rope`` replaces this part of diffusers' ``QwenDoubleStreamAttnProcessor2_0``::

    img_q, img_k, txt_q, txt_k = norm_q(img_q), norm_k(img_k), norm_added_q(txt_q), norm_added_k(txt_k)
    img_q, img_k = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False), ...  (and txt_q, txt_k with txt_freqs)
    joint_q, joint_k = torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1)

``qk_norm_rope`` is the same for one token stream, into fresh outputs, given buffers or in place.
RoPE tables are shared by the batch (``[S, D/2]``) or per sample (``[B, S, D/2]``).

Modules: ``qk_norm_rope`` (the public ops: argument checks and backend choice), ``reference`` (the
functional definition the backends are tested against), ``torch_backend`` and ``triton_backend``,
and ``compiled_figures`` (what the Triton kernels compile to for sm_90, measured without a GPU).
Importing this package needs torch only (not diffusers; triton when the Triton backend is used).
"""

from .qk_norm_rope import BACKEND_ENV_VAR, BACKENDS, joint_qk_norm_rope, qk_norm_rope
from .reference import joint_qk_norm_rope_reference, qk_norm_rope_reference

__all__ = [
    "BACKEND_ENV_VAR",
    "BACKENDS",
    "joint_qk_norm_rope",
    "joint_qk_norm_rope_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
]
