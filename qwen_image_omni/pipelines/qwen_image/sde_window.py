"""The SDE window of a Qwen-Image rollout: which steps draw SDE noise and are recorded for the trainer."""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_int, check_noise_level, check_number
from ..schedulers.flow_match_sde import SDE_TYPES


def check_sde_window(sde_window: tuple[int, int], num_steps: int) -> tuple[int, int]:
    """Validate ``(start, end)``: ints with ``0 <= start < end <= num_steps``; return it as a tuple."""
    if not isinstance(sde_window, (tuple, list)) or len(sde_window) != 2:
        raise ValueError(f"`sde_window` must be a (start, end) pair, got {sde_window!r}")
    start, end = check_int("`sde_window[0]`", sde_window[0]), check_int("`sde_window[1]`", sde_window[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(
            f"`sde_window` must satisfy 0 <= start < end <= num_steps={num_steps}, got ({start}, {end})"
        )
    return start, end


def full_sde_window(num_steps: int) -> tuple[int, int]:
    """The window used when no ``sde_window_size`` is given: every step but the last, ``(0, N - 1)``.

    The last step lands on sigma = 0, where ``"cps"`` has zero noise (no density to train on); this
    is verl-omni's default as well.
    """
    num_steps = check_int("`num_steps`", num_steps, 1)
    return (0, max(1, num_steps - 1))


def sample_sde_window(
    sde_window_size: int,
    sde_window_range: tuple[int, int],
    num_steps: int,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Draw the SDE window: ``start ~ U{range[0], ..., range[1] - size}``, ``end = start + size``.

    Args:
        sde_window_size: number of SDE steps W.
        sde_window_range: ``(low, high)`` envelope the whole window must lie in (``high`` exclusive,
            at most ``num_steps``).
        num_steps: number of denoising steps; the window must end at or before it.
        generator: random generator for the draw (the rollout passes its SDE generator).

    Raises:
        ValueError: a size or range that does not fit, whatever the draw would give.
        TypeError: a non-int size, bound or step count.
    """
    size = check_int("`sde_window_size`", sde_window_size, 1)
    low, high = _check_window_range(sde_window_range, size, check_int("`num_steps`", num_steps, 1))
    device = generator.device if generator is not None else "cpu"
    start = int(torch.randint(low, high - size + 1, (1,), generator=generator, device=device).item())
    return check_sde_window((start, start + size), num_steps)


def sample_sde_windows(
    sde_window_size: int | None,
    sde_window_range: tuple[int, int],
    num_steps: int,
    generator: torch.Generator | list[torch.Generator] | None,
    batch_size: int,
) -> list[tuple[int, int]]:
    """One SDE window per sample: each drawn from that sample's generator when ``generator`` is a list.

    A packed request batch then rolls out what each request would alone (verl-omni main's
    ``request_batch`` contract). One generator (or None) draws one window that every sample shares;
    no ``sde_window_size`` gives every sample :func:`full_sde_window`.

    Raises:
        ValueError, TypeError: as :func:`sample_sde_window`; a generator list whose length is not
            ``batch_size``.
    """
    batch_size = check_int("`batch_size`", batch_size, 1)
    if sde_window_size is None:
        return [full_sde_window(num_steps)] * batch_size
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f"`generator` must hold one generator per sample ({batch_size}), got {len(generator)}")
        return [sample_sde_window(sde_window_size, sde_window_range, num_steps, each) for each in generator]
    return [sample_sde_window(sde_window_size, sde_window_range, num_steps, generator)] * batch_size


def _check_window_range(sde_window_range: tuple[int, int], size: int, num_steps: int) -> tuple[int, int]:
    """``(low, high)`` with room for a window of ``size`` steps inside ``[0, num_steps)``."""
    if not isinstance(sde_window_range, (tuple, list)) or len(sde_window_range) != 2:
        raise ValueError(f"`sde_window_range` must be a (low, high) pair, got {sde_window_range!r}")
    low = check_int("`sde_window_range[0]`", sde_window_range[0])
    high = check_int("`sde_window_range[1]`", sde_window_range[1])
    if low < 0 or high - low < size:
        raise ValueError(
            f"`sde_window_range` (low, high) must have 0 <= low and high - low >= sde_window_size={size}, "
            f"got ({low}, {high})"
        )
    # Checked here, not on the drawn window, so a range past the end fails on every call, not on some draws.
    if high > num_steps:
        raise ValueError(
            f"`sde_window_range` ({low}, {high}) ends past the trajectory's num_inference_steps={num_steps}; "
            f"pass a range with high <= {num_steps}"
        )
    return low, high


def check_sde_type(sde_type: str) -> str:
    """``sde_type`` if it is one of :data:`SDE_TYPES`, else a ``ValueError`` naming it."""
    if sde_type not in SDE_TYPES:
        raise ValueError(f"`sde_type` must be one of {SDE_TYPES}, got {sde_type!r}")
    return sde_type


def check_rollout_scales(true_cfg_scale: Any, guidance_scale: Any, noise_level: Any, sde_type: str) -> None:
    """A rollout's scales must be finite numbers >= 0: a NaN would silently turn CFG off or give NaN log-probs."""
    check_sde_type(sde_type)
    check_number("`true_cfg_scale`", true_cfg_scale, 0.0)
    check_number("`guidance_scale`", guidance_scale, 0.0)
    check_noise_level("`noise_level`", noise_level, sde_type)
