"""``qwen-image-omni check``: ours, diffusers' class and the legacy vllm-omni text RoPE length, side by side.

Runs our transformer, diffusers' ``QwenImageTransformer2DModel`` and the legacy emulation
(:mod:`qwen_image_omni.check.legacy`) on the same weights and the same CFG prompts collated to a
fixed width, and reports how far each is from diffusers and whether its image output depends on
padding. :mod:`.sources` says where the weights come from, :mod:`.runs` runs the forwards,
:mod:`.report` prints the table and the verdict.
"""

from __future__ import annotations

import torch

from .report import FOOTNOTES, format_table, header_lines, make_row, table_lines, tolerance_for, verdict
from .runs import IMPLEMENTATIONS, collect_outputs, make_inputs
from .sources import pretrained_source, tiny_source

__all__ = ["run_check"]

TINY_LATENT_GRID = (1, 8, 8)
PRETRAINED_LATENT_GRID = (1, 32, 32)  # 512x512 pixels: 8x VAE, 2x2 patches


def run_check(model: str | None, dtype: torch.dtype, device: torch.device) -> int:
    """Print the comparison table; 0 if ours matches diffusers and is padding-invariant, 1 otherwise.

    Args:
        model: a diffusers checkpoint (``PATH/transformer`` or a folder holding ``config.json``),
            or None for the tiny random-weight transformer built in code.
        dtype: the precision every implementation runs in (diffusers also runs in fp32 below fp32,
            to measure its own rounding error, which sets the tolerance).
        device: where the models run, one at a time.

    Raises:
        ValueError: ``--model: ...`` for a folder that holds no loadable Qwen-Image transformer.
    """
    source = pretrained_source(model) if model else tiny_source()
    inputs = make_inputs(source.config, PRETRAINED_LATENT_GRID if model else TINY_LATENT_GRID, dtype)

    outputs = collect_outputs(source, inputs, dtype, device)
    tolerance, tolerance_line = tolerance_for(dtype, outputs)
    rows = {name: make_row(name, outputs, list(inputs.prompts)) for name in IMPLEMENTATIONS}
    passed, verdict_line = verdict(rows, tolerance)

    print("\n".join(header_lines(source, inputs, dtype, device)))
    print(format_table(table_lines(rows, tolerance)))
    print()
    print("\n".join(FOOTNOTES))
    print(tolerance_line)
    print(f"verdict: {verdict_line}")
    return 0 if passed else 1
