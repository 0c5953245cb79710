"""The table, tolerance and verdict that ``qwen-image-omni check`` prints."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint import dtype_name
from .runs import IMPLEMENTATIONS, PROMPT_VALID_TOKENS, CheckInputs
from .sources import ModelSource

FP32_ATOL = 1e-5
# bf16/fp16: ours may differ from diffusers by this many times diffusers' own error vs fp32.
LOW_PRECISION_FACTOR = 2.0


def max_abs_diff(a: torch.Tensor | Exception | None, b: torch.Tensor | Exception | None) -> float | None:
    """``max |a - b|``, or None when either run failed."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    return (a - b).abs().max().item()


def worst(values: list[float | None]) -> float | None:
    """The largest value, or None if any is missing."""
    if any(v is None for v in values):
        return None
    return max(values)


@dataclass
class Row:
    """One implementation's line of the table: diffs vs diffusers, padding invariance, status."""

    name: str
    pos_right: float | None
    neg_right: float | None
    left: float | None
    invariance: float | None
    error: str | None

    def numbers(self) -> list[float | None]:
        """The four measured values, None where a run failed."""
        return [self.pos_right, self.neg_right, self.left, self.invariance]

    def status(self, tolerance: float) -> str:
        """``ERROR: <message>``, ``NO REFERENCE`` (diffusers failed), ``DIVERGES`` or ``OK``.

        ``DIVERGES``: a diff or the padding invariance is above ``tolerance``.
        """
        if self.error is not None:
            return f"ERROR: {self.error}"
        if any(v is None for v in self.numbers()):
            return "NO REFERENCE"
        if any(v > tolerance for v in self.numbers()):
            return "DIVERGES"
        return "OK"


def error_message(outputs: list) -> str | None:
    """The first failed run's message on one line, or None."""
    for output in outputs:
        if isinstance(output, Exception):
            return " ".join(str(output).split()) or type(output).__name__
    return None


def make_row(name: str, outputs: dict, prompts: list[str]) -> Row:
    """Compare ``name``'s outputs with diffusers' on the same (prompt, layout), and padded vs unpadded."""

    def vs_reference(prompt: str, layout: str) -> float | None:
        return max_abs_diff(outputs[name, prompt, layout], outputs["diffusers", prompt, layout])

    return Row(
        name=name,
        pos_right=vs_reference("pos", "right"),
        neg_right=vs_reference("neg", "right"),
        left=worst([vs_reference(p, "left") for p in prompts]),
        invariance=worst([max_abs_diff(outputs[name, p, "right"], outputs[name, p, "unpadded"]) for p in prompts]),
        error=error_message([outputs[key] for key in outputs if key[0] == name]),
    )


def tolerance_for(dtype: torch.dtype, outputs: dict) -> tuple[float, str]:
    """The pass threshold and a line explaining it.

    fp32: :data:`FP32_ATOL` absolute. bf16/fp16: :data:`LOW_PRECISION_FACTOR` times diffusers' own
    error in that dtype against diffusers in fp32 on the same weights and inputs (at least
    :data:`FP32_ATOL`): ours passes if it is no further from diffusers than that.
    """
    if dtype == torch.float32:
        return FP32_ATOL, f"tolerance: {FP32_ATOL:.1e} abs (fp32)"
    own_error = worst([
        max_abs_diff(outputs[key], outputs[("diffusers-fp32",) + key[1:]]) for key in outputs if key[0] == "diffusers"
    ])
    if own_error is None:
        failed = f"diffusers failed in {dtype_name(dtype)} or fp32: no baseline"
        return FP32_ATOL, f"tolerance: {FP32_ATOL:.1e} abs ({failed})"
    tolerance = max(LOW_PRECISION_FACTOR * own_error, FP32_ATOL)
    return tolerance, (
        f"tolerance: {tolerance:.1e} abs = {LOW_PRECISION_FACTOR:g} x diffusers' own {dtype_name(dtype)} error "
        f"vs diffusers fp32 on the same weights ({own_error:.1e})"
    )


def format_number(value: float | None) -> str:
    """A diff in a table cell: ``1.2e-07``, or ``-`` where the run failed."""
    return "-" if value is None else f"{value:.1e}"


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, the first row being the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def table_lines(rows: dict[str, Row], tolerance: float) -> list[list[str]]:
    """Header plus one line per implementation, diffusers first as the reference."""
    lines = [["implementation", "pos right", "neg right", "left pad", "pad-invariance", "status"]]
    for name in IMPLEMENTATIONS:
        row = rows[name]
        if name == "diffusers":
            status = "reference" if row.error is None else f"ERROR: {row.error}"
            lines.append([name, "reference", "reference", "reference", format_number(row.invariance), status])
        else:
            cells = [format_number(v) for v in row.numbers()]
            lines.append([name, *cells, row.status(tolerance)])
    return lines


def verdict(rows: dict[str, Row], tolerance: float) -> tuple[bool, str]:
    """Pass iff ours runs, matches diffusers within ``tolerance`` and is padding-invariant."""
    ours = rows["ours"]
    status = ours.status(tolerance)
    passed = status == "OK"
    legacy = ", ".join(f"{name} {rows[name].status(tolerance).split(':')[0]}" for name in IMPLEMENTATIONS[2:])
    match = worst([ours.pos_right, ours.neg_right, ours.left])
    return passed, (
        f"{'PASS' if passed else 'FAIL'}: ours {status.split(':')[0]}, vs diffusers max |diff| {format_number(match)}, "
        f"padding invariance {format_number(ours.invariance)} (tolerance {tolerance:.1e}); {legacy}"
    )


def header_lines(source: ModelSource, inputs: CheckInputs, dtype: torch.dtype, device: torch.device) -> list[str]:
    """What was run, in a few lines above the table."""
    grid = inputs.img_shapes[0][0]
    image_tokens = inputs.hidden_states.shape[1]
    valid = PROMPT_VALID_TOKENS
    return [
        "qwen-image-omni check",
        f"model:   {source.description}",
        f"run:     {dtype_name(dtype)} on {device}; latent grid {grid} = {image_tokens} image tokens; "
        "batch 1 per CFG branch",
        f"prompts: positive {valid['pos']} valid tokens, negative {valid['neg']}, collated to width {inputs.width} "
        "(zero embeddings, mask 0); unpadded = width of the valid tokens, all-ones mask",
        f"legacy:  text RoPE length max(mask.sum(dim=1)) = {valid['pos']} / {valid['neg']} instead of the width, "
        "on diffusers' class; native = short table as is, kernel = positions past it left unrotated",
        "",
        "max |diff| of the image-token output vs diffusers' QwenImageTransformer2DModel (same weights):",
    ]


FOOTNOTES = [
    "pos/neg right: right padding (valid tokens first); left pad: the same prompts left-padded, max of pos/neg;",
    "pad-invariance: right-padded vs unpadded output of the same implementation, max of pos/neg.",
    "With right padding every position past max(mask.sum()) is masked out of attention, so the legacy",
    "kernel flavour only changes image outputs when valid tokens sit past it (left pad); the native",
    "flavour fails on any padding.",
]
