"""Configuration of a diffusion model for the RL pipelines: ``DiffusionModelConfig``.

The same fields as verl-omni's ``DiffusionModelConfig`` that the pipeline adapters read,
as plain dataclasses: ``architecture`` and ``algorithm`` select the adapter,
``pipeline`` holds the sampling parameters and ``algo`` the SDE rollout parameters. Adapters read
them as ``model_config.pipeline.true_cfg_scale``, ``model_config.algo.noise_level`` and so on.

Defaults are verl-omni's (``trainer/config/diffusion/model/diffusion_model.yaml``): RL-rollout
settings, small and fast, not Qwen-Image's inference defaults (1328x1328, 50 steps,
``true_cfg_scale=4.0``). No field holds a text length: the transformer reads it from the tensor.

Every value is checked when the config is built; a bad one raises ``ValueError`` (or ``TypeError``
for a wrong type) naming the field, what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .checks import check_image_size, check_int, check_noise_level, check_number
from .model_base import import_external_libs

SDE_TYPES: tuple[str, ...] = ("sde", "cps", "dance_sde")
"""Reverse-step variants of ``FlowMatchSDEDiscreteScheduler`` that ``algo.sde_type`` may name."""

SAMPLE_STRATEGIES: tuple[str, ...] = ("random", "progressive")
"""How MixGRPO places its SDE window (``algo.sample_strategy``)."""

_HYDRA_KEYS = frozenset({"_target_"})


def _from_mapping(cls: type, data: Mapping[str, Any], where: str):
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ValueError`` naming them."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{where} must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in data if k not in names and k not in _HYDRA_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {unknown}; allowed: {names}")
    return cls(**{k: v for k, v in data.items() if k not in _HYDRA_KEYS})


@dataclass
class DiffusionPipelineConfig:
    """Sampling parameters shared by rollout and training.

    Args:
        height: image height in pixels, a multiple of 16 (an 8x VAE and 2x2 latent patches, for
            Qwen-Image and SD3 alike; default 512).
        width: image width in pixels, a multiple of 16 (default 512).
        num_inference_steps: denoising steps of a rollout trajectory (default 10).
        true_cfg_scale: Qwen-Image's true classifier-free guidance scale; guidance (a second,
            negative-prompt forward) is on only when it is ``> 1`` (default 1.0, off).
        guidance_scale: the distilled guidance scale fed to guidance-embedding transformers, or,
            for SD3, the classifier-free guidance scale (on when ``> 1``); ``None`` when unused
            (default).
        max_sequence_length: most text-encoder tokens kept per prompt (default 512). It bounds
            the prompt, not the RoPE table: the transformer sizes that from the tensor width.
    """

    height: int = 512
    width: int = 512
    num_inference_steps: int = 10
    true_cfg_scale: float = 1.0
    guidance_scale: float | None = None
    max_sequence_length: int = 512

    def __post_init__(self):
        self.height = check_image_size("pipeline.height", self.height)
        self.width = check_image_size("pipeline.width", self.width)
        self.num_inference_steps = check_int("pipeline.num_inference_steps", self.num_inference_steps, 1)
        self.true_cfg_scale = check_number("pipeline.true_cfg_scale", self.true_cfg_scale, 0.0)
        if self.guidance_scale is not None:
            self.guidance_scale = check_number("pipeline.guidance_scale", self.guidance_scale, 0.0)
        self.max_sequence_length = check_int("pipeline.max_sequence_length", self.max_sequence_length, 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiffusionPipelineConfig:
        """Build from a mapping; unknown keys raise ``ValueError`` (a Hydra ``_target_`` is ignored)."""
        return _from_mapping(cls, data, "pipeline")


@dataclass
class DiffusionAlgoConfig:
    """Parameters of the stochastic (SDE) rollout used by Flow-GRPO-style algorithms.

    Args:
        noise_level: SDE noise magnitude ``eta`` inside the window, ``>= 0`` (``<= 1`` for
            ``"cps"``; default 1.0).
        sde_type: reverse-step variant, one of ``"sde"``, ``"cps"``, ``"dance_sde"`` (default ``"sde"``).
        sde_window_size: number of consecutive denoising steps taken stochastically (and trained
            on); ``None`` (default) means the adapter's full window, every step but the last (whose
            target sigma is 0), as in verl-omni.
        sde_window_range: ``(start, end)`` step indices the window must lie in (``end`` exclusive);
            the window start is drawn from ``[start, end - sde_window_size]``. ``None`` means the whole trajectory
            (default). A list from YAML is stored as a tuple.
        sde_contiguous: the SDE steps form one contiguous window (default ``True``). Qwen-Image
            rollouts record a contiguous window (``all_latents`` holds consecutive states); they
            refuse ``False`` with a ``ValueError``.
        sample_strategy: MixGRPO's window placement, ``"random"`` (a draw seeded by
            ``sde_window_seed + global_steps``) or ``"progressive"`` (default ``"random"``).
        iters_per_group: MixGRPO ``"progressive"``: training steps between two advances of the
            window, ``>= 1`` (default 1).
        sde_window_seed: MixGRPO ``"random"``: base seed of the per-step window draw, ``>= 0`` (default 0).
    """

    noise_level: float = 1.0
    sde_type: str = "sde"
    sde_window_size: int | None = None
    sde_window_range: tuple[int, int] | None = None
    sde_contiguous: bool = True
    sample_strategy: str = "random"
    iters_per_group: int = 1
    sde_window_seed: int = 0

    def __post_init__(self):
        if self.sde_type not in SDE_TYPES:
            raise ValueError(f"algo.sde_type must be one of {list(SDE_TYPES)}, got {self.sde_type!r}")
        self.noise_level = check_noise_level("algo.noise_level", self.noise_level, self.sde_type)
        if self.sde_window_size is not None:
            self.sde_window_size = check_int("algo.sde_window_size", self.sde_window_size, 1)
        if self.sde_window_range is not None:
            window_range = self.sde_window_range
            if isinstance(window_range, (str, bytes)) or not hasattr(window_range, "__len__") or len(window_range) != 2:
                raise ValueError(f"algo.sde_window_range must be a pair (start, end), got {window_range!r}")
            start = check_int("algo.sde_window_range[0]", window_range[0], 0)
            end = check_int("algo.sde_window_range[1]", window_range[1], 0)
            if end <= start:
                raise ValueError(f"algo.sde_window_range must have start < end, got ({start}, {end})")
            if self.sde_window_size is not None and end - start < self.sde_window_size:
                raise ValueError(
                    f"algo.sde_window_range ({start}, {end}) spans {end - start} steps, fewer than "
                    f"algo.sde_window_size={self.sde_window_size}"
                )
            self.sde_window_range = (start, end)
        if not isinstance(self.sde_contiguous, bool):
            raise TypeError(f"algo.sde_contiguous must be a bool, got {type(self.sde_contiguous).__name__}")
        if self.sample_strategy not in SAMPLE_STRATEGIES:
            raise ValueError(f"algo.sample_strategy must be one of {list(SAMPLE_STRATEGIES)}, got {self.sample_strategy!r}")
        self.iters_per_group = check_int("algo.iters_per_group", self.iters_per_group, 1)
        self.sde_window_seed = check_int("algo.sde_window_seed", self.sde_window_seed, 0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiffusionAlgoConfig:
        """Build from a mapping; unknown keys raise ``ValueError`` (a Hydra ``_target_`` is ignored)."""
        return _from_mapping(cls, data, "algo")


def read_architecture(local_path: str | os.PathLike) -> str:
    """Return ``_class_name`` from ``local_path/model_index.json`` (e.g. ``"QwenImagePipeline"``).

    Raises:
        ValueError: the file is missing, is not JSON object, or has no string ``_class_name``.
    """
    index_path = os.path.join(os.fspath(local_path), "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(
            f"architecture was not given and {index_path} does not exist; pass architecture=... "
            "or a diffusers pipeline directory as local_path"
        )
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {index_path}: {exc}") from exc
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(class_name, str) or not class_name:
        raise ValueError(
            f"{index_path} has no '_class_name' string (got {class_name!r}); pass architecture=... explicitly"
        )
    return class_name


@dataclass
class DiffusionModelConfig:
    """Which diffusion model and algorithm to run, and how to sample it.

    Args:
        architecture: the pipeline class name from ``model_index.json``'s ``_class_name``
            (e.g. ``"QwenImagePipeline"``, ``"StableDiffusion3Pipeline"``). When ``None`` it is read
            from ``local_path/model_index.json``.
        algorithm: the training algorithm (default ``"flow_grpo"``; also ``"mix_grpo"``, ``"dpo"``).
            With ``architecture`` it selects the registered adapter.
        local_path: the diffusers pipeline directory on disk, or ``None``.
        pipeline: sampling parameters, a :class:`DiffusionPipelineConfig` or a mapping of its fields.
        algo: SDE rollout parameters, a :class:`DiffusionAlgoConfig` or a mapping of its fields.
        external_lib: module(s) to import so that they register their adapters (verl-omni's field;
            a name, a comma-separated string or a list), imported when the config is built.

    Raises:
        ValueError: no architecture and no readable ``model_index.json``; a field out of range;
            an SDE window longer than ``pipeline.num_inference_steps``.
        TypeError: a field of the wrong type.
    """

    architecture: str | None = None
    algorithm: str = "flow_grpo"
    local_path: str | None = None
    pipeline: DiffusionPipelineConfig = field(default_factory=DiffusionPipelineConfig)
    algo: DiffusionAlgoConfig = field(default_factory=DiffusionAlgoConfig)
    external_lib: str | list[str] | None = None

    def __post_init__(self):
        import_external_libs(self.external_lib)
        if self.local_path is not None:
            if not isinstance(self.local_path, (str, os.PathLike)):
                raise TypeError(f"local_path must be a str or os.PathLike, got {type(self.local_path).__name__}")
            self.local_path = os.fspath(self.local_path)
        if self.architecture is None:
            if self.local_path is None:
                raise ValueError(
                    "DiffusionModelConfig needs architecture (e.g. 'QwenImagePipeline') or a local_path "
                    "whose model_index.json names it; got neither"
                )
            self.architecture = read_architecture(self.local_path)
        for name in ("architecture", "algorithm"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty str, got {value!r}")
        if isinstance(self.pipeline, Mapping):
            self.pipeline = DiffusionPipelineConfig.from_dict(self.pipeline)
        elif not isinstance(self.pipeline, DiffusionPipelineConfig):
            raise TypeError(
                f"pipeline must be a DiffusionPipelineConfig or a mapping, got {type(self.pipeline).__name__}"
            )
        if isinstance(self.algo, Mapping):
            self.algo = DiffusionAlgoConfig.from_dict(self.algo)
        elif not isinstance(self.algo, DiffusionAlgoConfig):
            raise TypeError(f"algo must be a DiffusionAlgoConfig or a mapping, got {type(self.algo).__name__}")
        steps = self.pipeline.num_inference_steps
        if self.algo.sde_window_size is not None and self.algo.sde_window_size > steps:
            raise ValueError(
                f"algo.sde_window_size={self.algo.sde_window_size} exceeds pipeline.num_inference_steps={steps}"
            )
        if self.algo.sde_window_range is not None and self.algo.sde_window_range[1] > steps:
            raise ValueError(
                f"algo.sde_window_range={self.algo.sde_window_range} ends past "
                f"pipeline.num_inference_steps={steps}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiffusionModelConfig:
        """Build from a (possibly nested) mapping, e.g. a parsed YAML section.

        ``pipeline`` and ``algo`` may be mappings; unknown keys at any level raise ``ValueError``
        naming them. A Hydra ``_target_`` key is ignored at every level.
        """
        return _from_mapping(cls, data, "DiffusionModelConfig")

    def to_dict(self) -> dict[str, Any]:
        """Return the config as nested plain dicts (``from_dict(to_dict())`` round-trips)."""
        return dataclasses.asdict(self)
