"""Fused q/k RMSNorm + RoPE + joint ``[text, image]`` concatenation (placeholder, being written)."""
