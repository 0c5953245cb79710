"""Tiny random Qwen-Image transformers and inputs for tests: ours and diffusers' class, same weights."""

from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel as DiffusersQwenImageTransformer2DModel

from qwen_image_omni import QwenImageTransformer2DModel

TINY_CONFIG = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(8, 12, 12),
)


def make_pair(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """Return ``(ours, reference)``: the same random weights in our class and in diffusers' class."""
    config = {**TINY_CONFIG, **overrides}
    torch.manual_seed(seed)
    reference = DiffusersQwenImageTransformer2DModel(**config).eval()
    # Random, not default-initialised, modulation and norm weights so every path is exercised.
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif "_mod." in name or name.startswith("norm_out") or name.startswith("proj_out"):
                param.copy_(0.05 * torch.randn_like(param))
    ours = QwenImageTransformer2DModel(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    if dtype != torch.float32:
        ours, reference = ours.to(dtype), reference.to(dtype)
    return ours, reference


def make_inputs(
    batch: int = 2,
    img_shapes=((1, 4, 6),),
    text_width: int = 7,
    valid=None,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
    config: dict | None = None,
):
    """Random model inputs. ``valid``: per-sample valid text lengths (right padding) or None for no mask."""
    config = {**TINY_CONFIG, **(config or {})}
    generator = torch.Generator().manual_seed(seed)
    image_tokens = sum(f * h * w for f, h, w in img_shapes)
    inputs = dict(
        hidden_states=torch.randn(batch, image_tokens, config["in_channels"], generator=generator, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text_width, config["joint_attention_dim"], generator=generator).to(
            dtype
        ),
        timestep=torch.rand(batch, generator=generator).to(dtype),
        img_shapes=[list(img_shapes)] * batch,
    )
    if valid is not None:
        mask = torch.zeros(batch, text_width, dtype=torch.long)
        for i, n in enumerate(valid):
            mask[i, :n] = 1
        inputs["encoder_hidden_states_mask"] = mask
    return inputs


def run(model, inputs) -> torch.Tensor:
    """One forward pass, no grad, returning the sample tensor."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]
