"""The ``qwen-image-omni`` command line: ``check``, ``generate`` and ``bench``.

``check`` runs our transformer, diffusers' ``QwenImageTransformer2DModel`` and the legacy vllm-omni
emulation (:mod:`qwen_image_omni.legacy`) on the same weights and the same padded CFG prompts, and
prints how far each is from diffusers and whether its image output depends on padding.
``generate`` makes an image from a prompt with diffusers' Qwen-Image pipeline running our
transformer (:mod:`qwen_image_omni.generate`).
``bench`` runs the benchmark scripts of a source checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import inspect
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel as DiffusersTransformer
from diffusers.utils import is_accelerate_available
from torch import nn
from tqdm import tqdm

from .legacy import legacy_forward
from .models import QwenImageTransformer2DModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The embedded default: a small random-weight Qwen-Image transformer, nothing downloaded.
TINY_CONFIG = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "axes_dims_rope": (8, 12, 12),
}
TINY_SEED = 0
TINY_LATENT_GRID = (1, 8, 8)
PRETRAINED_LATENT_GRID = (1, 32, 32)  # 512x512 pixels: 8x VAE, 2x2 patches
INPUT_SEED = 1234

# A CFG pair of very different valid lengths, collated to one fixed width as RL trainers do.
PROMPT_VALID_TOKENS = {"pos": 37, "neg": 5}
PROMPT_WIDTH = 256
LAYOUTS = ("right", "left", "unpadded")

FP32_ATOL = 1e-5
# bf16/fp16: ours may differ from diffusers by this many times diffusers' own error vs fp32.
LOW_PRECISION_FACTOR = 2.0
PROGRESS_DELAY_S = 2.0

# What from_pretrained reads, in the order it looks: one of them must be in the component's folder.
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)
TRANSFORMER_CLASS = "QwenImageTransformer2DModel"
# Config keys without which from_pretrained would silently build diffusers' default (a 60-layer model).
REQUIRED_CONFIG_KEYS = ("in_channels", "num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim")
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's largest seed

IMPLEMENTATIONS = ("diffusers", "ours", "legacy-native", "legacy-kernel")
BENCHMARKS = {
    "transformer": "bench_transformer.py",
    "qk-norm-rope": "bench_qk_norm_rope.py",
    "rollout-kl": "rollout_trainer_kl.py",
}


# ----------------------------------------------------------------------------- models


@dataclass
class ModelSource:
    """Where the weights of ``check`` come from: a description, the config and a loader.

    ``load(cls, dtype)`` returns a ``cls`` instance (ours or diffusers' class) holding the source's
    weights in ``dtype``, on the CPU.
    """

    description: str
    config: dict
    load: Callable[[type, torch.dtype], nn.Module]


def tiny_source() -> ModelSource:
    """The embedded default: :data:`TINY_CONFIG` with weights drawn from seed :data:`TINY_SEED`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        state = DiffusersTransformer(**TINY_CONFIG).state_dict()

    def load(cls: type, dtype: torch.dtype) -> nn.Module:
        model = cls(**TINY_CONFIG)
        model.load_state_dict(state, strict=True)
        # nn.Module.to: ModelMixin.to warns about fp32-kept modules on every dtype cast, and there are none.
        return nn.Module.to(model, dtype)

    heads, head_dim = TINY_CONFIG["num_attention_heads"], TINY_CONFIG["attention_head_dim"]
    description = (
        f"tiny random Qwen-Image transformer (seed {TINY_SEED}: {TINY_CONFIG['num_layers']} layers, "
        f"{heads} heads x {head_dim}, joint_attention_dim {TINY_CONFIG['joint_attention_dim']}, "
        f"in/out channels {TINY_CONFIG['in_channels']}/{TINY_CONFIG['out_channels']})"
    )
    return ModelSource(description, dict(TINY_CONFIG), load)


def resolve_transformer_dir(path: str) -> tuple[str, str | None]:
    """``(root, subfolder)`` for ``from_pretrained``: ``PATH/transformer`` or PATH itself.

    Raises:
        ValueError: neither ``PATH/transformer/config.json`` nor ``PATH/config.json`` exists.
    """
    root = Path(path)
    if (root / "transformer" / "config.json").is_file():
        return str(root), "transformer"
    if (root / "config.json").is_file():
        return str(root), None
    raise ValueError(
        f"--model: expected a diffusers checkpoint directory holding transformer/config.json "
        f"or config.json, got {path!r}"
    )


def read_json(path: Path, option: str) -> dict:
    """A JSON object from ``path``; ``ValueError`` naming ``option`` when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{option}: cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{option}: {path} is not a JSON object")
    return data


def check_weights(folder: Path, names: tuple[str, ...], option: str) -> None:
    """``ValueError`` naming ``option`` unless ``folder`` holds one of the weight files ``names``."""
    if not any((folder / name).is_file() for name in names):
        raise ValueError(f"{option}: {folder} holds no weights; expected one of {', '.join(names)}")


def check_transformer_folder(folder: Path, option: str) -> dict:
    """The config of a Qwen-Image transformer folder, checked before any (slow) load.

    Raises:
        ValueError: naming ``option``: ``config.json`` unreadable or not a JSON object, naming
            another class, lacking a size or holding one that is not a positive int; no weights.
    """
    config_path = folder / "config.json"
    config = read_json(config_path, option)
    class_name = config.get("_class_name", TRANSFORMER_CLASS)
    if class_name != TRANSFORMER_CLASS:
        raise ValueError(f"{option}: {config_path} is the config of a {class_name!r}, not of a {TRANSFORMER_CLASS}")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"{option}: {config_path} lacks {', '.join(missing)}; not a {TRANSFORMER_CLASS} config")
    for key in REQUIRED_CONFIG_KEYS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{option}: {config_path}: {key} must be a positive int, got {value!r}")
    check_weights(folder, DIFFUSERS_WEIGHTS, option)
    return config


def summarize(error: BaseException, lines: int = 2) -> str:
    """The first ``lines`` lines of an error message on one line (a state-dict error lists every tensor)."""
    text = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    more = f" (and {len(text) - lines} more lines)" if len(text) > lines else ""
    return " ".join(text[:lines]) + more


def pretrained_source(path: str) -> ModelSource:
    """A checkpoint's transformer in diffusers layout, loaded with ``from_pretrained`` by each class.

    Raises:
        ValueError: ``--model: ...`` for a folder that is no Qwen-Image transformer (see
            :func:`check_transformer_folder`); later, from ``load``, for weights that do not load.
    """
    root, subfolder = resolve_transformer_dir(path)
    location = str(Path(root) / subfolder) if subfolder else root
    config = check_transformer_folder(Path(location), "--model")

    def load(cls: type, dtype: torch.dtype) -> nn.Module:
        # Explicit, so diffusers does not warn on every load when accelerate is missing.
        low_cpu_mem_usage = is_accelerate_available()
        try:
            return cls.from_pretrained(
                root, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=low_cpu_mem_usage
            )
        except (OSError, RuntimeError, ValueError) as error:  # unreadable weights, or weights not fitting the config
            raise ValueError(f"--model: cannot load the transformer in {location}: {summarize(error)}") from None

    description = (
        f"{location} ({config['num_layers']} layers, {config['num_attention_heads']} heads x "
        f"{config['attention_head_dim']}, joint_attention_dim {config['joint_attention_dim']})"
    )
    return ModelSource(description, config, load)


@contextlib.contextmanager
def loaded(source: ModelSource, cls: type, dtype: torch.dtype, device: torch.device) -> Iterator[nn.Module]:
    """Context manager: one model on ``device`` in eval mode, freed on exit.

    Only one model is held at a time so that ``--model`` on a large checkpoint needs the memory of
    one transformer, not three.
    """
    model = source.load(cls, dtype).to(device).eval()
    try:
        yield model
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- inputs


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


# ----------------------------------------------------------------------------- runs


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


# ----------------------------------------------------------------------------- report


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


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16``."""
    return next(name for name, value in DTYPES.items() if value == dtype)


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


def parse_device(name: str | None) -> torch.device:
    """``--device``: the named device, or cuda when available and cpu otherwise.

    Raises:
        ValueError: the name is not a torch device, or it is cuda and no GPU is available.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected a torch device such as cpu or cuda:0, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} requested but torch.cuda.is_available() is False")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device: {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def check(args: argparse.Namespace) -> int:
    """``qwen-image-omni check``: print the comparison table; 0 if ours matches diffusers, 1 otherwise.

    With ``--vllm-omni``: the vllm-omni plugin report instead
    (:func:`qwen_image_omni.integrations.vllm_omni_check.check_vllm_omni`).
    """
    if args.vllm_omni:
        from .integrations.vllm_omni_check import check_vllm_omni

        return check_vllm_omni()
    device = parse_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if args.model else "fp32")]
    source = pretrained_source(args.model) if args.model else tiny_source()
    grid = PRETRAINED_LATENT_GRID if args.model else TINY_LATENT_GRID
    inputs = make_inputs(source.config, grid, dtype)

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


# ----------------------------------------------------------------------------- generate


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed ``torch.Generator.manual_seed`` takes, an integer in ``[0, 2**64 - 1]``."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64 - 1], got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` parse as floats but scale nothing)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def generate(args: argparse.Namespace) -> int:
    """``qwen-image-omni generate``: one text-to-image run, see :mod:`qwen_image_omni.generate`."""
    # Imported here, so that check and bench never depend on diffusers' pipeline modules.
    from .generate import run_generate

    device = parse_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    return run_generate(args, device, dtype)


# ----------------------------------------------------------------------------- bench


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout this package was installed from (editable installs)."""
    return Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """Import a benchmark script as a module (its ``main(argv)`` is not run on import)."""
    path = benchmarks_dir() / BENCHMARKS[name]
    if not path.is_file():
        raise ValueError(
            f"benchmark {name!r}: expected the script at {path}, which is missing; the benchmarks ship "
            f"with a source checkout: run `python benchmarks/{BENCHMARKS[name]}` there"
        )
    spec = importlib.util.spec_from_file_location(f"qwen_image_omni_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise ValueError(f"benchmark {name!r}: {path} has no main(argv); run `python {path}` instead")
    return module


def run_benchmark(module, argv: list[str]) -> int:
    """Call a benchmark's ``main``, with ``sys.argv`` set as if the script had been run with ``argv``.

    ``main(argv)`` gets the list when it takes an argument (so it never parses this command's own
    arguments); a ``main()`` without one reads the patched ``sys.argv``.
    """
    takes_argv = bool(inspect.signature(module.main).parameters)
    saved = sys.argv
    sys.argv = [module.__file__, *argv]
    try:
        return int((module.main(list(argv)) if takes_argv else module.main()) or 0)
    finally:
        sys.argv = saved


def bench(args: argparse.Namespace) -> int:
    """``qwen-image-omni bench [NAME] [ARGS...]``: run one benchmark script (or all) with its own arguments."""
    if args.name == "all" and args.args:
        raise ValueError(f"bench: arguments go to one benchmark; name one of {list(BENCHMARKS)}, got 'all'")
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    modules = [load_benchmark(name) for name in names]  # all found before any runs
    return max(run_benchmark(module, args.args) for module in modules)


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qwen-image-omni``."""
    parser = argparse.ArgumentParser(prog="qwen-image-omni", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check_parser = commands.add_parser(
        "check",
        help="compare ours, diffusers and the legacy vllm-omni text RoPE length on padded prompts",
        description="Compare ours, diffusers' class and the legacy vllm-omni text RoPE length on padded "
        "CFG prompts. Without --model, on a tiny random-weight transformer built in code.",
    )
    check_parser.add_argument(
        "--model", metavar="PATH", help="diffusers checkpoint (PATH/transformer, or PATH holding config.json)"
    )
    check_parser.add_argument("--dtype", choices=DTYPES, help="default: fp32 (tiny model), bf16 (--model)")
    check_parser.add_argument("--device", help="default: cuda when available, else cpu")
    check_parser.add_argument(
        "--vllm-omni",
        action="store_true",
        help="instead: is vllm-omni installed, does our plugin load and take every Qwen-Image architecture, "
        "which engine features run on ours (exit 1 when the plugin fails)",
    )
    check_parser.set_defaults(func=check)

    generate_parser = commands.add_parser(
        "generate",
        help="text-to-image with a diffusers Qwen-Image checkpoint, running our transformer",
        description="Text-to-image with diffusers' QwenImagePipeline on a local diffusers Qwen-Image checkpoint "
        "(model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/), its transformer "
        "replaced by ours. Nothing is downloaded.",
    )
    generate_parser.add_argument(
        "--model", metavar="PATH", required=True, help="diffusers Qwen-Image checkpoint directory"
    )
    generate_parser.add_argument("--prompt", metavar="TEXT", required=True)
    generate_parser.add_argument("--out", metavar="FILE.png", required=True, help="where to write the image")
    generate_parser.add_argument(
        "--negative-prompt", metavar="TEXT", help="enables true CFG (Qwen-Image's examples use ' '); default: no CFG"
    )
    size_help = "pixels, a multiple of 16; default: the pipeline's (1024)"
    generate_parser.add_argument("--height", type=positive_int, help=size_help)
    generate_parser.add_argument("--width", type=positive_int, help=size_help)
    generate_parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default: 50)")
    generate_parser.add_argument(
        "--true-cfg-scale", type=finite_float, metavar="SCALE",
        help="CFG scale with --negative-prompt, above 1 (default: 4.0)",
    )  # fmt: skip
    generate_parser.add_argument("--seed", type=seed, help="noise seed in [0, 2**64 - 1] (default: random, printed)")
    generate_parser.add_argument("--dtype", choices=DTYPES, help="default: bf16 on cuda, fp32 on cpu")
    generate_parser.add_argument("--device", help="default: cuda when available, else cpu")
    generate_parser.set_defaults(func=generate)

    bench_parser = commands.add_parser(
        "bench",
        help="run the benchmark scripts of a source checkout",
        description="Run benchmarks/bench_transformer.py and/or benchmarks/bench_qk_norm_rope.py; "
        "arguments after NAME go to that script (see `qwen-image-omni bench transformer --help`).",
    )
    bench_parser.add_argument("name", nargs="?", default="all", choices=[*BENCHMARKS, "all"])
    bench_parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench_parser.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``qwen-image-omni``; returns the exit status (2 for usage errors).

    A bad argument argparse cannot see (a checkpoint that does not load, a size that does not fit)
    is one line on stderr, ``qwen-image-omni COMMAND: error: ...``, as argparse words its own.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except ValueError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
