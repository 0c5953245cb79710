"""The run's reward: the image's mean brightness in [0, 1] (verl-omni's ``custom_reward_function``)."""

from __future__ import annotations

from typing import Any

import torch


def compute_score(data_source: Any = None, solution_image: torch.Tensor | None = None, **_: Any) -> float:
    """Mean of the uint8 pixels of ``solution_image``, scaled to [0, 1].

    Raises:
        ValueError: no image came (verl-omni passes the rollout's pixels as ``solution_image``).
    """
    if solution_image is None:
        raise ValueError("compute_score needs `solution_image` (uint8 pixels), got None")
    return float(solution_image.float().mean() / 255.0)
