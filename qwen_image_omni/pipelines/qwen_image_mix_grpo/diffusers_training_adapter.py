"""Qwen-Image for MixGRPO: FlowGRPO's step functions with a sliding SDE window.

MixGRPO (arXiv 2507.21802) mixes ODE and SDE sampling: only a window of ``sde_window_size``
consecutive steps is stochastic (and trained on); every other step is a deterministic Euler step.
The per-step math is FlowGRPO's, inherited unchanged from :class:`QwenImage` and
:class:`QwenImagePipelineWithLogProb`; what MixGRPO adds is *where* the window sits:

- ``"random"``: the start is drawn uniformly from the envelope ``sde_window_range`` with
  ``random.Random(sde_window_seed + global_steps)``, so it changes every training step but every
  rank (every rollout worker) draws the same window for the same step;
- ``"progressive"``: the window starts at the envelope's start and advances by
  ``sde_window_size`` steps every ``iters_per_group`` training steps, then stays at the
  envelope's end.

All rollouts of one training step share one window, which MixGRPO's group advantages need.
"""


from __future__ import annotations

import random
from typing import Any

from ..checks import check_int
from ..config import DiffusionModelConfig
from ..model_base import DiffusionModelBase
from ..qwen_image import check_sde_window, full_sde_window
from ..qwen_image_flow_grpo.diffusers_training_adapter import QwenImage

__all__ = [
    "MIX_GRPO_ROLLOUT_OPTIONS",
    "WINDOW_STRATEGIES",
    "QwenImageMixGRPO",
    "mix_grpo_sde_window",
    "pin_sde_window_range",
]

WINDOW_STRATEGIES: tuple[str, ...] = ("random", "progressive")
"""How MixGRPO places the SDE window: seeded random draw, or a window that slides with training."""

MIX_GRPO_ROLLOUT_OPTIONS: dict[str, Any] = {
    "sample_strategy": "random",
    "global_steps": 0,
    "iters_per_group": 1,
    "sde_window_seed": 0,
}
"""The rollout options MixGRPO adds to FlowGRPO's, with their defaults (see :func:`mix_grpo_sde_window`)."""


def _check_schedule(sample_strategy: str, global_steps: int, iters_per_group: int, sde_window_seed: int) -> None:
    """Every schedule option, whatever the strategy: a bad one is a bad config even where it is not read."""
    if sample_strategy not in WINDOW_STRATEGIES:
        raise ValueError(f"`sample_strategy` must be one of {WINDOW_STRATEGIES}, got {sample_strategy!r}")
    check_int("`global_steps`", global_steps, 0)
    check_int("`iters_per_group`", iters_per_group, 1)
    check_int("`sde_window_seed`", sde_window_seed, 0)


def _envelope(sde_window_range: tuple[int, int], sde_window_size: int) -> tuple[int, int]:
    """Validate ``(low, high)`` (``high`` exclusive); return the first and last possible window start."""
    if not isinstance(sde_window_range, (tuple, list)) or len(sde_window_range) != 2:
        raise ValueError(f"`sde_window_range` must be a (low, high) pair, got {sde_window_range!r}")
    low = check_int("`sde_window_range[0]`", sde_window_range[0], 0)
    high = check_int("`sde_window_range[1]`", sde_window_range[1], 0)
    if high - low < sde_window_size:
        raise ValueError(
            f"MixGRPO window of sde_window_size={sde_window_size} steps does not fit in "
            f"sde_window_range=({low}, {high}) ({high - low} steps)"
        )
    return low, high - sde_window_size


def mix_grpo_sde_window(
    sample_strategy: str,
    sde_window_size: int,
    sde_window_range: tuple[int, int],
    global_steps: int,
    iters_per_group: int = 1,
    sde_window_seed: int = 0,
) -> tuple[int, int]:
    """The MixGRPO SDE window ``(start, start + sde_window_size)`` for training step ``global_steps``.

    A pure function of its arguments: every rank computes the same window for the same step.

    Args:
        sample_strategy: ``"random"`` or ``"progressive"`` (see the module docstring).
        sde_window_size: number of SDE steps W.
        sde_window_range: ``(low, high)`` envelope the window lies in (``high`` exclusive).
        global_steps: the trainer's current training step (>= 0).
        iters_per_group: ``"progressive"``: training steps between two advances of the window.
        sde_window_seed: ``"random"``: base seed; the draw uses ``sde_window_seed + global_steps``.

    Raises:
        ValueError: unknown strategy, a negative step or seed, an interval below 1, a window that
            does not fit the envelope (each checked whatever the strategy).
        TypeError: a non-int size, step, interval, seed or envelope bound.
    """
    _check_schedule(sample_strategy, global_steps, iters_per_group, sde_window_seed)
    size = check_int("`sde_window_size`", sde_window_size, 1)
    first, last = _envelope(sde_window_range, size)
    if sample_strategy == "random":
        start = random.Random(int(sde_window_seed) + int(global_steps)).randint(first, last)
    else:
        start = min(first + int(global_steps) // int(iters_per_group) * size, last)
    return start, start + size


def pin_sde_window_range(
    sde_window_size: int | None,
    sde_window_range: tuple[int, int],
    sample_strategy: str = "random",
    global_steps: int = 0,
    iters_per_group: int = 1,
    sde_window_seed: int = 0,
) -> tuple[int, int]:
    """The ``sde_window_range`` that makes a FlowGRPO rollout's window draw land on this step's MixGRPO window.

    A FlowGRPO rollout draws its window start inside ``sde_window_range``; shrinking the range to
    the MixGRPO window (:func:`mix_grpo_sde_window`) pins the draw. With no ``sde_window_size``
    the rollout uses the full window and the range is returned unchanged.

    Raises:
        ValueError, TypeError: as :func:`mix_grpo_sde_window`.
    """
    _check_schedule(sample_strategy, global_steps, iters_per_group, sde_window_seed)
    if sde_window_size is None:
        return sde_window_range
    return mix_grpo_sde_window(
        sample_strategy, sde_window_size, sde_window_range, global_steps, iters_per_group, sde_window_seed
    )


@DiffusionModelBase.register("QwenImagePipeline", algorithm="mix_grpo")
class QwenImageMixGRPO(QwenImage):
    """Training adapter for Qwen-Image with the MixGRPO algorithm.

    Scheduler, model inputs and the forward + reverse step are :class:`QwenImage`'s (the trainer
    scores whatever window the rollout recorded in ``all_timesteps``). Adds :meth:`sde_window`, the
    window the rollout uses at a training step, computed from ``model_config.algo``.
    """

    @classmethod
    def sde_window(
        cls,
        model_config: DiffusionModelConfig,
        global_steps: int,
        sample_strategy: str | None = None,
        iters_per_group: int | None = None,
        sde_window_seed: int | None = None,
    ) -> tuple[int, int]:
        """The SDE window at training step ``global_steps`` for ``model_config``.

        Uses ``algo.sde_window_size`` and ``algo.sde_window_range``; with no size, the full window
        (:func:`full_sde_window`); with no range, the envelope is the full window. The schedule
        options default to ``algo.sample_strategy``, ``algo.iters_per_group`` and ``algo.sde_window_seed``.

        Args:
            model_config: provides ``algo`` and ``pipeline.num_inference_steps``.
            global_steps, sample_strategy, iters_per_group, sde_window_seed: as in :func:`mix_grpo_sde_window`;
                ``None`` takes the value from ``model_config.algo``.
        """
        algo = model_config.algo
        sample_strategy = algo.sample_strategy if sample_strategy is None else sample_strategy
        iters_per_group = algo.iters_per_group if iters_per_group is None else iters_per_group
        sde_window_seed = algo.sde_window_seed if sde_window_seed is None else sde_window_seed
        num_steps = model_config.pipeline.num_inference_steps
        size = algo.sde_window_size
        if size is None:
            _check_schedule(sample_strategy, global_steps, iters_per_group, sde_window_seed)
            return full_sde_window(num_steps)
        envelope = algo.sde_window_range or full_sde_window(num_steps)
        window = mix_grpo_sde_window(sample_strategy, size, envelope, global_steps, iters_per_group, sde_window_seed)
        return check_sde_window(window, num_steps)
