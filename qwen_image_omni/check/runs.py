"""The forward runs of ``qwen-image-omni check``: one CFG pair collated three ways, through each implementation."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from diffusers import QwenImageTransformer2DModel as DiffusersTransformer
from torch import nn
from tqdm import tqdm

from ..checkpoint import dtype_name
from ..models import QwenImageTransformer2DModel
from .legacy import legacy_forward
from .sources import ModelSource, loaded

INPUT_SEED = 1234

# A CFG pair of very different valid lengths, collated to one fixed width as RL trainers do.
PROMPT_VALID_TOKENS = {"pos": 37, "neg": 5}
PROMPT_WIDTH = 256
LAYOUTS = ("right", "left", "unpadded")

IMPLEMENTATIONS = ("diffusers", "ours", "legacy-native", "legacy-kernel")
PROGRESS_DELAY_S = 2.0


@dataclass
class CheckInputs:
    """The latents, timestep, image shapes and valid prompt embeddings every run of ``check`` uses."""

    hidden_states: torch.Tensor  # [1, image_tokens, in_channels]
    timestep: torch.Tensor  # [1]
    img_shapes: list
    prompts: dict[str, torch.Tensor]  # name -> [1, valid_tokens, joint_attention_dim]
    width: int


def make_inputs(config: dict, latent_grid: tuple[int, int, int], dtype: torch.dtype) -> CheckInputs:
    """Random inputs from :data:`INPUT_SEED`, rounded to ``dtype`` once so every precision sees the same values."""
    generator = torch.Generator().manual_seed(INPUT_SEED)
    image_tokens = latent_grid[0] * latent_grid[1] * latent_grid[2]
    hidden_states = torch.randn(1, image_tokens, config["in_channels"], generator=generator)
    prompts = {
        name: torch.randn(1, valid, config["joint_attention_dim"], generator=generator).to(dtype)
        for name, valid in PROMPT_VALID_TOKENS.items()
    }
    return CheckInputs(
        hidden_states=hidden_states.to(dtype),
        timestep=torch.tensor([0.5]),
        img_shapes=[[latent_grid]],
        prompts=prompts,
        width=PROMPT_WIDTH,
    )


def collate(embeds: torch.Tensor, width: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and 0/1 mask for one layout.

    Args:
        embeds: ``[1, valid, dim]`` valid prompt embeddings.
        width: collated width (``right``/``left``); ``unpadded`` keeps ``valid`` with an all-ones mask.
        layout: ``right`` (valid tokens first, zeros after), ``left`` (zeros first) or ``unpadded``.
    """
    batch, valid, dim = embeds.shape
    if layout == "unpadded":
        return embeds, torch.ones(batch, valid, dtype=torch.long)
    if layout not in ("right", "left"):
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if width < valid:
        raise ValueError(f"width must be >= the valid token count {valid}, got {width}")
    padded = embeds.new_zeros(batch, width, dim)
    mask = torch.zeros(batch, width, dtype=torch.long)
    columns = slice(0, valid) if layout == "right" else slice(width - valid, width)
    padded[:, columns] = embeds
    mask[:, columns] = 1
    return padded, mask


def forward_kwargs(inputs: CheckInputs, prompt: str, layout: str, dtype: torch.dtype, device: torch.device) -> dict:
    """Keyword arguments of one transformer call (batch 1: one CFG branch, as vllm-omni runs them)."""
    embeds, mask = collate(inputs.prompts[prompt], inputs.width, layout)
    return {
        "hidden_states": inputs.hidden_states.to(device, dtype),
        "encoder_hidden_states": embeds.to(device, dtype),
        "encoder_hidden_states_mask": mask.to(device),
        "timestep": inputs.timestep.to(device),
        "img_shapes": inputs.img_shapes,
        "return_dict": False,
    }


def run_one(model: nn.Module, legacy_mode: str | None, kwargs: dict) -> torch.Tensor | Exception:
    """The image-token output as fp32 on the CPU, or the exception the forward raised."""
    try:
        with torch.no_grad():
            if legacy_mode is None:
                output = model(**kwargs)[0]
            else:
                output = legacy_forward(model, legacy_mode, **kwargs)[0]
    except Exception as error:  # reported in the table, e.g. the legacy shape error
        return error
    return output.float().cpu()


def run_plan(dtype: torch.dtype) -> list[tuple[type, torch.dtype, dict[str, str | None]]]:
    """Which class to load in which dtype, and the implementations (label -> legacy mode) run on it.

    The legacy emulation runs on diffusers' class: vllm-omni's transformer is a port of it.
    Below fp32, diffusers also runs in fp32 on the same weights to measure its own rounding error.
    """
    plan = [
        (DiffusersTransformer, dtype, {"diffusers": None, "legacy-native": "native", "legacy-kernel": "kernel"}),
        (QwenImageTransformer2DModel, dtype, {"ours": None}),
    ]
    if dtype != torch.float32:
        plan.insert(0, (DiffusersTransformer, torch.float32, {"diffusers-fp32": None}))
    return plan


def collect_outputs(
    source: ModelSource, inputs: CheckInputs, dtype: torch.dtype, device: torch.device
) -> dict[tuple[str, str, str], torch.Tensor | Exception]:
    """Run every implementation on every (prompt, layout); keyed ``(label, prompt, layout)``.

    A progress bar goes to stderr when the runs take longer than :data:`PROGRESS_DELAY_S`.
    """
    plan = run_plan(dtype)
    cases = [(prompt, layout) for prompt in inputs.prompts for layout in LAYOUTS]
    total = sum(len(labels) for _, _, labels in plan) * len(cases)
    outputs = {}
    with tqdm(total=total, desc="check", unit="forward", file=sys.stderr, delay=PROGRESS_DELAY_S, leave=False) as bar:
        for cls, run_dtype, labels in plan:
            # refresh=False: a refresh would show the bar before PROGRESS_DELAY_S has passed.
            bar.set_postfix_str(f"loading {next(iter(labels))} {dtype_name(run_dtype)}", refresh=False)
            with loaded(source, cls, run_dtype, device) as model:
                for label, legacy_mode in labels.items():
                    bar.set_postfix_str(label, refresh=False)
                    for prompt, layout in cases:
                        kwargs = forward_kwargs(inputs, prompt, layout, run_dtype, device)
                        outputs[label, prompt, layout] = run_one(model, legacy_mode, kwargs)
                        bar.update()
    return outputs
