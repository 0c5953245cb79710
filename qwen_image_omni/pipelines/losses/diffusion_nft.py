"""The DiffusionNFT objective (arXiv 2509.16117) as plain functions: batch preparation and the loss.

DiffusionNFT trains on the forward (noising) process, not on reverse-SDE log-probabilities. A rollout
samples a clean latent ``x0`` per prompt with the ODE; rewards are turned into an *optimality
probability* ``r`` per sample; the trainer noises ``x0`` to ``x_t = (1 - t) x0 + t eps`` at a few of
the rollout's timesteps and contrasts two velocity predictions mixed from the current policy
``v_theta`` and the frozen rollout ("old") policy ``v_old``:

- implicit positive policy ``v+ = beta v_theta + (1 - beta) v_old``,
- implicit negative policy ``v- = (1 + beta) v_old - beta v_theta``.

Each gives a clean-latent estimate ``x0_hat = x_t - t v``; its squared error to ``x0``, divided by an
adaptive (no-grad) per-sample weight ``mean |x0_hat - x0|`` (clipped below at ``adaptive_weight_min``),
is the positive / negative loss. High-reward samples pull ``v+`` towards ``x0``, low-reward ones pull
``v-``::

    policy_loss = mean_b[(r_b L+_b + (1 - r_b) L-_b) / beta] * adv_clip_max
    loss        = policy_loss + ref_kl_coef * mean_b mean |v_theta - v_ref|^2

The math is verl-omni main's ``DiffusionNFTLoss`` (``verl_omni/trainer/diffusion/diffusion_algos.py``)
and its trainer-side helpers, step for step, so the numbers agree (``tests/integrations/verl_omni/test_qwen_image_diffusion_nft.py``):

- :func:`group_advantages`: per-prompt centred (optionally std-normalised) rewards;
- :func:`advantage_to_reward_prob`: clip, optional sign mode, map ``[-clip, clip] -> [0, 1]``;
- :func:`select_train_timesteps`: a random ``timestep_fraction`` of each row's rollout timesteps;
- :func:`forward_process_sample`: ``x_t`` and ``t`` broadcast, as verl-omni's NFT engine builds them;
- :func:`diffusion_nft_loss`: the loss and its metrics.

Nothing here depends on the architecture, and nothing takes a text length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..checks import check_int, check_number

__all__ = [
    "ADV_MODES",
    "advantage_to_reward_prob",
    "diffusion_nft_loss",
    "forward_process_sample",
    "group_advantages",
    "select_train_timesteps",
]

ADV_MODES: tuple[str, ...] = ("continuous", "positive_only", "negative_only", "one_only", "binary")
"""How :func:`advantage_to_reward_prob` treats the clipped advantages (verl-omni's ``algorithm.adv_mode``)."""


def _check_tensor(name: str, value: Any, min_ndim: int = 0) -> torch.Tensor:
    """``value`` if it is a floating or integer tensor with at least ``min_ndim`` dims."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim < min_ndim:
        raise ValueError(f"`{name}` must have at least {min_ndim} dims, got shape {tuple(value.shape)}")
    return value


def group_advantages(
    rewards: torch.Tensor,
    uid: Sequence[Any] | np.ndarray,
    norm_by_std: bool = True,
    global_std: bool = False,
    epsilon: float = 1e-4,
) -> torch.Tensor:
    """Per-prompt centred rewards: ``(r_i - mean_{g(i)} r) / (std_{g(i)} + epsilon)``.

    DiffusionNFT Sec. 3.3 / Algorithm 1, steps 4-5 (verl-omni's ``_compute_group_advantages``). These
    are not policy-gradient advantages: :func:`advantage_to_reward_prob` maps them to the optimality
    probability that weights the loss.

    Args:
        rewards: ``(B,)`` raw rewards (detached and computed in float32).
        uid: ``B`` group ids (samples of one prompt share an id): a list, tuple or NumPy array.
        norm_by_std: divide by the standard deviation (else only centre).
        global_std: use the whole batch's standard deviation for every group instead of the group's.
        epsilon: added to the standard deviation.

    A group of one sample has standard deviation 1 (unless ``global_std``); standard deviations are
    the unbiased (``n - 1``) ones, as ``torch.std``.

    Returns:
        ``(B,)`` float32 advantages.

    Raises:
        TypeError: ``rewards`` is not a tensor, ``uid`` not a sequence.
        ValueError: ``rewards`` not 1-D, or ``uid`` of another length.
    """
    rewards = _check_tensor("rewards", rewards)
    if rewards.ndim != 1:
        raise ValueError(f"`rewards` must be (batch,), got shape {tuple(rewards.shape)}")
    if isinstance(uid, (str, bytes)) or not hasattr(uid, "__len__"):
        raise TypeError(f"`uid` must be a sequence of group ids, got {type(uid).__name__}")
    if len(uid) != rewards.shape[0]:
        raise ValueError(f"`uid` must hold one group id per reward ({rewards.shape[0]}), got {len(uid)}")
    epsilon = check_number("`epsilon`", epsilon, 0.0)
    rewards = rewards.detach().float()
    groups: dict[Any, list[int]] = {}
    for row, group in enumerate(uid):
        groups.setdefault(group, []).append(row)
    batch_std = rewards.std() if global_std else None
    advantages = rewards.clone()
    for rows in groups.values():
        scores = rewards[rows]
        centred = scores - scores.mean()
        if norm_by_std:
            if global_std:
                std = batch_std
            elif len(rows) > 1:
                std = scores.std()
            else:
                std = torch.ones((), device=rewards.device)
            centred = centred / (std + epsilon)
        advantages[rows] = centred
    return advantages


def advantage_to_reward_prob(
    advantages: torch.Tensor, adv_clip_max: float = 5.0, adv_mode: str = "continuous"
) -> torch.Tensor:
    """The optimality probability ``r = clamp(a / adv_clip_max / 2 + 1/2, 0, 1)`` of clipped advantages.

    Advantages are first clipped to ``[-adv_clip_max, adv_clip_max]``; then ``adv_mode``
    (verl-omni's ``_advantage_to_reward_prob``):

    - ``"continuous"``: as they are;
    - ``"positive_only"`` / ``"negative_only"``: negatives / positives set to 0 (``r = 1/2``);
    - ``"one_only"``: 1 where positive, else 0 (``r`` is ``1/2 + 1/(2 clip)`` or ``1/2``);
    - ``"binary"``: the sign (``r`` is ``1/2 ± 1/(2 clip)`` or ``1/2``).

    Raises:
        TypeError: ``advantages`` is not a tensor, ``adv_clip_max`` not a number.
        ValueError: ``adv_clip_max <= 0`` or an unknown ``adv_mode``.
    """
    advantages = _check_tensor("advantages", advantages)
    adv_clip_max = check_number("`adv_clip_max`", adv_clip_max, 0.0)
    if adv_clip_max == 0:
        raise ValueError("`adv_clip_max` must be > 0, got 0.0")
    if adv_mode not in ADV_MODES:
        raise ValueError(f"`adv_mode` must be one of {ADV_MODES}, got {adv_mode!r}")
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        clipped = clipped.clamp(min=0)
    elif adv_mode == "negative_only":
        clipped = clipped.clamp(max=0)
    elif adv_mode == "one_only":
        clipped = (clipped > 0).to(clipped.dtype)
    elif adv_mode == "binary":
        clipped = clipped.sign()
    return (clipped / adv_clip_max / 2.0 + 0.5).clamp(0, 1)


def select_train_timesteps(
    train_timesteps: torch.Tensor, timestep_fraction: float = 1.0, seed: int | None = None
) -> torch.Tensor:
    """Pick ``max(1, int(T * timestep_fraction))`` of each row's ``T`` rollout timesteps, in random order.

    Each row gets its own permutation; with a ``seed`` all rows draw from one generator seeded with it
    (row after row), so the choice is reproducible across ranks. verl-omni's ``_select_train_timesteps``,
    including its result dtype: the timesteps come back as ``torch.long``, so a scheduler timestep such
    as ``743.13`` is truncated to ``743`` (the trainer then noises at ``t = 0.743``).

    Args:
        train_timesteps: ``(B, T)`` timesteps the rollout recorded (``rl["train_timesteps"]``).
        timestep_fraction: fraction in ``(0, 1]`` of the timesteps to train on.
        seed: seed of the permutations, or None for torch's global generator.

    Returns:
        ``(B, max(1, int(T * timestep_fraction)))`` long timesteps.

    Raises:
        TypeError: not a tensor, a non-number fraction, a non-int seed.
        ValueError: not ``(B, T)``, or a fraction outside ``(0, 1]``.
    """
    train_timesteps = _check_tensor("train_timesteps", train_timesteps)
    if train_timesteps.ndim != 2:
        raise ValueError(f"`train_timesteps` must be (batch, timesteps), got shape {tuple(train_timesteps.shape)}")
    timestep_fraction = check_number("`timestep_fraction`", timestep_fraction, 0.0)
    if not 0 < timestep_fraction <= 1:
        raise ValueError(f"`timestep_fraction` must be in (0, 1], got {timestep_fraction}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=train_timesteps.device).manual_seed(check_int("`seed`", seed))
    count = train_timesteps.shape[1]
    keep = max(1, int(count * timestep_fraction))
    orders = [torch.randperm(count, generator=generator, device=train_timesteps.device)[:keep] for _ in train_timesteps]
    if not orders:
        return train_timesteps.new_zeros((0, keep), dtype=torch.long)
    return torch.gather(train_timesteps, 1, torch.stack(orders)).long()


def forward_process_sample(
    x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow-matching forward process: ``x_t = (1 - t) x0 + t noise`` with ``t = timesteps / 1000``.

    As verl-omni's DiffusionNFT engine builds the trainer's noised latent.

    Args:
        x0: ``(B, ...)`` clean latents (``rl["latents_clean"]``).
        timesteps: ``(B,)`` scheduler timesteps in ``[0, 1000]``.
        noise: noise of ``x0``'s shape, or None to draw standard normal noise.

    Returns:
        ``(x_t, t_expanded)``: ``x_t`` of ``x0``'s shape, ``t_expanded`` ``(B, 1, ..., 1)`` float32.

    Raises:
        TypeError, ValueError: a non-tensor, ``timesteps`` not ``(B,)``, ``noise`` of another shape.
    """
    x0 = _check_tensor("x0", x0, 1)
    timesteps = _check_tensor("timesteps", timesteps)
    if tuple(timesteps.shape) != (x0.shape[0],):
        raise ValueError(f"`timesteps` must be (batch,) = ({x0.shape[0]},), got shape {tuple(timesteps.shape)}")
    if noise is None:
        noise = torch.randn_like(x0.float())
    elif not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"`noise` must have the shape of `x0` {tuple(x0.shape)}, got {shape}")
    t_expanded = (timesteps.float() / 1000.0).view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - t_expanded) * x0 + t_expanded * noise, t_expanded


def diffusion_nft_loss(
    forward_prediction: torch.Tensor,
    old_prediction: torch.Tensor,
    ref_forward_prediction: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t_expanded: torch.Tensor,
    reward_prob: torch.Tensor,
    *,
    mix_beta: float = 0.5,
    adv_clip_max: float = 5.0,
    ref_kl_coef: float = 0.0,
    adaptive_weight_min: float = 1e-5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DiffusionNFT loss of one training timestep (see the module docstring for the formula).

    Gradients flow only through ``forward_prediction``; the old and reference predictions are
    detached and the adaptive weights are computed without grad (in float64, then cast back).

    Args:
        forward_prediction: ``(B, ...)`` velocity of the policy being trained, ``v_theta(x_t, t)``.
        old_prediction: ``(B, ...)`` velocity of the rollout ("old") policy at the same inputs.
        ref_forward_prediction: ``(B, ...)`` velocity of the reference model (for the KL term).
        x0: ``(B, ...)`` clean latents the rollout produced.
        xt: ``(B, ...)`` noised latents, :func:`forward_process_sample`.
        t_expanded: ``t = timestep / 1000`` broadcastable to ``x0``, e.g. ``(B, 1, 1)``.
        reward_prob: ``(B,)`` optimality probabilities (:func:`advantage_to_reward_prob`); a tensor
            with more dims is averaged per sample.
        mix_beta: ``beta`` > 0 of the implicit policies (verl-omni's ``diffusion_loss.mix_beta``).
        adv_clip_max: the advantage clip, which also scales the policy loss (as verl-omni does).
        ref_kl_coef: weight >= 0 of the reference KL term.
        adaptive_weight_min: lower clip > 0 of the adaptive weights.

    Returns:
        ``(loss, metrics)``: the scalar loss and verl-omni's metric names (``actor/policy_loss``,
        ``actor/positive_loss``, ``actor/negative_loss``, ``actor/ref_kl_loss``, ``actor/old_deviate``,
        ``actor/reward_prob_mean``, ``actor/total_loss``) as Python floats.

    Raises:
        TypeError: a non-tensor input or a non-number coefficient.
        ValueError: predictions / latents of different shapes, a ``reward_prob`` without one value
            per sample, a ``t_expanded`` that does not broadcast, a coefficient out of range.
    """
    names = ("forward_prediction", "old_prediction", "ref_forward_prediction", "x0", "xt")
    tensors = [
        _check_tensor(name, value, 1)
        for name, value in zip(names, (forward_prediction, old_prediction, ref_forward_prediction, x0, xt))
    ]
    for name, value in zip(names[:3] + names[4:], tensors[:3] + tensors[4:]):
        if value.shape != x0.shape:
            raise ValueError(f"`{name}` must have the shape of `x0` {tuple(x0.shape)}, got {tuple(value.shape)}")
    t_expanded = _check_tensor("t_expanded", t_expanded)
    try:
        torch.broadcast_shapes(t_expanded.shape, x0.shape)
    except RuntimeError:
        raise ValueError(
            f"`t_expanded` must broadcast to `x0` {tuple(x0.shape)}, e.g. (batch, 1, 1), got {tuple(t_expanded.shape)}"
        ) from None
    reward_prob = _check_tensor("reward_prob", reward_prob, 1)
    if reward_prob.shape[0] != x0.shape[0]:
        raise ValueError(
            f"`reward_prob` must hold one value per sample ({x0.shape[0]}), got {tuple(reward_prob.shape)}"
        )
    beta = check_number("`mix_beta`", mix_beta, 0.0)
    if beta == 0:
        raise ValueError("`mix_beta` must be > 0, got 0.0")
    adv_clip_max = check_number("`adv_clip_max`", adv_clip_max, 0.0)
    ref_kl_coef = check_number("`ref_kl_coef`", ref_kl_coef, 0.0)
    adaptive_weight_min = check_number("`adaptive_weight_min`", adaptive_weight_min, 0.0)
    if adaptive_weight_min == 0:
        raise ValueError("`adaptive_weight_min` must be > 0, got 0.0")

    old = old_prediction.detach()
    ref = ref_forward_prediction.detach()
    weight = reward_prob.flatten(1).mean(dim=1) if reward_prob.ndim > 1 else reward_prob
    weight = weight.to(device=x0.device, dtype=x0.dtype)
    per_sample = tuple(range(1, x0.ndim))

    positive_velocity = beta * forward_prediction + (1.0 - beta) * old
    negative_velocity = (1.0 + beta) * old - beta * forward_prediction
    positive_x0 = xt - t_expanded * positive_velocity
    negative_x0 = xt - t_expanded * negative_velocity

    def adaptive_weight(estimate: torch.Tensor) -> torch.Tensor:
        """``mean |estimate - x0|`` per sample, at least ``adaptive_weight_min``, no grad."""
        with torch.no_grad():
            error = (estimate.double() - x0.double()).abs().mean(dim=per_sample, keepdim=True)
            return error.clip(min=adaptive_weight_min).to(estimate.dtype)

    positive_loss = ((positive_x0 - x0) ** 2 / adaptive_weight(positive_x0)).mean(dim=per_sample)
    negative_loss = ((negative_x0 - x0) ** 2 / adaptive_weight(negative_x0)).mean(dim=per_sample)
    policy_per_sample = weight * positive_loss / beta + (1.0 - weight) * negative_loss / beta
    policy_loss = (policy_per_sample * adv_clip_max).mean()
    ref_kl_loss = ((forward_prediction - ref) ** 2).mean(dim=per_sample).mean()
    loss = policy_loss + ref_kl_coef * ref_kl_loss

    with torch.no_grad():
        metrics = {
            "actor/policy_loss": policy_loss.item(),
            "actor/positive_loss": positive_loss.mean().item(),
            "actor/negative_loss": negative_loss.mean().item(),
            "actor/ref_kl_loss": ref_kl_loss.item(),
            "actor/old_deviate": ((forward_prediction - old) ** 2).mean().item(),
            "actor/reward_prob_mean": weight.mean().item(),
            "actor/total_loss": loss.item(),
        }
    return loss, metrics
