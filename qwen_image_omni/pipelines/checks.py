"""Argument checks shared by the RL pipelines, the config and the scheduler.

Each returns the checked value (normalised to a Python ``int`` / ``float``) or raises ``TypeError``
(wrong type) or ``ValueError`` (out of range) naming the argument, what was expected and what came.
The caller spells the name as its users see it: ``"pipeline.height"`` for a config field,
``"`height`"`` for a function argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

__all__ = ["MIN_NOISE_LEVEL", "check_image_size", "check_int", "check_noise_level", "check_number", "check_step"]

# The smallest positive noise level of the Gaussian SDE types (see check_noise_level): at it the noise std of a
# Qwen-Image step is still above 1e-12, its variance far above float32's smallest normal number.
MIN_NOISE_LEVEL = 1e-6


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool) and ``>= minimum``.

    Integers are Python and NumPy ones and 0-d integer tensors (what indexing a step tensor gives).

    Raises:
        TypeError: ``value`` is not an integer (a float such as ``1.0``, or a tensor with elements
            that are not integers or more than one element, included).
        ValueError: ``value < minimum``.
    """
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() and not value.is_complex():
        if value.dtype != torch.bool:
            value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_number(name: str, value: Any, minimum: float | None = None) -> float:
    """``value`` as a float if it is a finite real number (not a bool) and ``>= minimum``.

    Raises:
        TypeError: ``value`` is not a real number (a tensor or a string included).
        ValueError: ``value`` is NaN, infinite or below ``minimum``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return value


def check_step(step: Any, trajectory: Any, name: str) -> int:
    """``step`` as an int if it indexes dimension 1 of ``trajectory`` (``(B, T, ...)``, named ``name``).

    Raises:
        TypeError: ``step`` is not an int (``1.0`` would index with a float: an ``IndexError`` deep down).
        ValueError: ``step`` is outside ``[0, T)``.
    """
    step = check_int("`step`", step, 0)
    if step >= trajectory.shape[1]:
        raise ValueError(
            f"`step` must be in [0, {trajectory.shape[1]}) for `{name}` of shape {tuple(trajectory.shape)}, got {step}"
        )
    return step


def check_image_size(name: str, value: Any, vae_scale_factor: int = 8) -> int:
    """``value`` as an int if it is a positive multiple of ``2 * vae_scale_factor`` pixels.

    An image of that size packs exactly into the 2x2 patches of VAE latents; any other size would
    be floored (silently cropping the image), as diffusers' pipelines do.

    Raises:
        TypeError: not an int.
        ValueError: not positive, or not a multiple of ``2 * vae_scale_factor``.
    """
    value = check_int(name, value, 1)
    multiple = 2 * check_int("`vae_scale_factor`", vae_scale_factor, 1)
    if value % multiple:
        lower = value // multiple * multiple
        suggestion = f"{lower} or {lower + multiple}" if lower else str(multiple)
        raise ValueError(
            f"{name} must be a multiple of {multiple} (VAE scale factor {multiple // 2} x 2x2 latent patches), "
            f"got {value}; try {suggestion}"
        )
    return value


def check_noise_level(name: str, value: Any, sde_type: str) -> float:
    """The SDE noise level ``eta``: a finite number ``>= 0``, and ``<= 1`` for ``sde_type="cps"``.

    CPS draws its noise with std ``sigma' * sin(eta * pi / 2)``, which only grows up to ``eta = 1``;
    past it the noise shrinks again (``eta = 2`` is deterministic) and turns negative past 2.
    ``"sde"`` and ``"dance_sde"`` score a sample with a Gaussian log-density that divides by the
    noise variance: below :data:`MIN_NOISE_LEVEL` (and above 0, the deterministic Euler step) that
    variance underflows float32 and the log-prob of any sample but the mean is ``-inf``.

    Raises:
        TypeError: not a number.
        ValueError: NaN, infinite, negative, above 1 for ``"cps"``, or between 0 and
            :data:`MIN_NOISE_LEVEL` for ``"sde"`` and ``"dance_sde"``.
    """
    value = check_number(name, value, 0.0)
    if sde_type != "cps" and 0 < value < MIN_NOISE_LEVEL:
        raise ValueError(
            f"{name} must be 0 (the deterministic Euler step) or >= {MIN_NOISE_LEVEL:g} for sde_type={sde_type!r}: "
            f"below that its Gaussian log-prob divides by a noise variance that float32 cannot hold, got {value:g}"
        )
    if sde_type == "cps" and value > 1:
        raise ValueError(
            f"{name} must be <= 1 for sde_type='cps' (its noise std is sigma' * sin(noise_level * pi / 2)), "
            f"got {value}"
        )
    return value
