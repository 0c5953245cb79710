"""vllm linear layers in our transformer, so vllm-omni's LoRA manager can wrap them.

vllm-omni's diffusion LoRA (static ``lora_path`` and per-request ``LoRARequest``) replaces vllm
``LinearBase`` layers with LoRA wrappers and leaves ``torch.nn.Linear`` alone. Inside vllm-omni our
transformer's ``nn.Linear`` modules are therefore swapped for vllm's ``ReplicatedLinear`` by
:func:`use_vllm_linear_layers`:

- same parameter names (``weight``, ``bias``), shapes, dtypes and storage, so diffusers' state-dict
  keys still load and nothing is copied;
- ``return_bias=False``, so ``forward`` returns one tensor as ``nn.Linear`` does;
- replicated on every rank (``disable_tp=True``), never sharded; vllm's parameters still read the
  tensor-parallel rank when they are created, so the swap runs inside vllm's initialised distributed
  environment (a vllm-omni worker always has one);
- ``y = torch.nn.functional.linear(x, weight, bias)``: vllm's unquantized method calls ``F.linear``
  on CUDA (its default linear backend), and on the CPU it is told to keep the plain ``F.linear``
  (``skip_weight_relayout``) rather than repack the weight for oneDNN or sgl-kernel, which would drop
  the ``weight`` parameter that the RL weight sync writes into. Outputs are bitwise those of the
  ``nn.Linear`` transformer.

This module needs vllm; the rest of the package imports without it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from vllm.model_executor.layers.linear import ReplicatedLinear

__all__ = ["BASE_LAYER", "diffusers_parameter_name", "use_vllm_linear_layers", "vllm_linear"]

BASE_LAYER = "base_layer"
"""The submodule name under which vllm's LoRA wrappers keep the layer they wrap."""


def vllm_linear(linear: nn.Linear, prefix: str = "") -> ReplicatedLinear:
    """A vllm ``ReplicatedLinear`` holding ``linear``'s own ``weight`` and ``bias`` tensors (no copy).

    Args:
        linear: the layer to replace (float weights, any device).
        prefix: the layer's name in the model, for vllm's logs.

    Returns:
        A layer whose ``forward(x)`` is ``F.linear(x, weight, bias)`` and returns one tensor.
    """
    weight = linear.weight
    with torch.device(weight.device):
        layer = ReplicatedLinear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            params_dtype=weight.dtype,
            prefix=prefix,
            return_bias=False,
            disable_tp=True,
        )
    # Share the storage: vllm's parameters keep their class and loader attributes, with our tensors.
    layer.weight.data = weight.data
    if linear.bias is not None:
        layer.bias.data = linear.bias.data
    # CPU: keep F.linear and the weight (vllm's CPU method would otherwise repack it and drop the
    # parameter after loading). Both attributes are ignored on other platforms.
    layer.skip_weight_relayout = True
    layer.cpu_linear = torch.nn.functional.linear
    return layer


def use_vllm_linear_layers(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` with :func:`vllm_linear`, in place.

    State-dict keys, parameter tensors and outputs stay the same. Only for use inside vllm-omni: the
    layers are inference-only (vllm parameters do not take gradients) and diffusers' own PEFT
    integration does not know them.

    Returns:
        The number of layers replaced.
    """
    targets = [(name, child) for name, child in module.named_modules() if type(child) is nn.Linear]
    for name, linear in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, vllm_linear(linear, prefix=name))
    return len(targets)


def diffusers_parameter_name(name: str) -> str:
    """``name`` without vllm LoRA wrappers' ``base_layer`` components (the diffusers state-dict key).

    ``transformer_blocks.0.attn.to_q.base_layer.weight`` -> ``transformer_blocks.0.attn.to_q.weight``.
    """
    return ".".join(part for part in name.split(".") if part != BASE_LAYER)
