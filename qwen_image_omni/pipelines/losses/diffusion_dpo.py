"""The pairwise Diffusion-DPO loss (Wallace et al., 2023), shared by every DPO adapter (SD3, Qwen-Image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["diffusion_dpo_loss"]


def diffusion_dpo_loss(
    model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise Diffusion-DPO loss (Wallace et al., 2023, arXiv:2311.12908).

    Rows ``2i`` and ``2i + 1`` of every tensor are the chosen (w) and rejected (l) sample of pair
    ``i``. With ``err(x) = mean((x - target)^2)`` over all non-batch dimensions (in fp32)::

        model_diff = err(model_pred)_w - err(model_pred)_l
        ref_diff   = err(ref_pred)_w   - err(ref_pred)_l
        inside     = -beta / 2 * (model_diff - ref_diff)
        loss       = mean over pairs of -log sigmoid(inside)

    The ``-beta / 2`` scaling is the reference implementation's (SalesforceAIResearch/DiffusionDPO
    ``train.py`` and diffusers' ``examples/research_projects/diffusion_dpo``:
    ``scale_term = -0.5 * beta_dpo``), so ``beta`` is their ``--beta_dpo`` (of order 10^3, e.g.
    2500 or 5000) with the paper's ``T * omega(lambda_t)`` folded in. ``ref_pred`` is detached.

    Args:
        model_pred: ``(B, ...)`` prediction of the trained model, ``B`` even.
        ref_pred: ``(B, ...)`` prediction of the frozen reference model.
        target: ``(B, ...)`` regression target (``noise - latents`` for SD3 flow matching).
        beta: the positive KL-regularisation strength.

    Returns:
        ``(loss, metrics)``: the scalar loss, and detached scalars ``implicit_acc`` (fraction of
        pairs with ``inside > 0``), ``model_mse``, ``ref_mse`` (mean errors over all rows),
        ``model_diff`` and ``ref_diff`` (mean chosen-minus-rejected error differences).

    Raises:
        ValueError: odd or zero batch, mismatched shapes, or a non-positive / non-finite ``beta``.
    """
    for name, value in (("model_pred", model_pred), ("ref_pred", ref_pred), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ref_pred.shape != model_pred.shape or target.shape != model_pred.shape:
        raise ValueError(
            "model_pred, ref_pred and target must have the same shape, got "
            f"{tuple(model_pred.shape)}, {tuple(ref_pred.shape)}, {tuple(target.shape)}"
        )
    if model_pred.ndim == 0 or model_pred.shape[0] == 0 or model_pred.shape[0] % 2:
        batch = model_pred.shape[0] if model_pred.ndim else "a scalar"
        raise ValueError(f"batch must hold (chosen, rejected) pairs: an even, non-zero batch size, got {batch}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0 < beta < float("inf")):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")

    def per_pair_errors(prediction: torch.Tensor) -> torch.Tensor:
        error = F.mse_loss(prediction.float(), target.float(), reduction="none")
        return error.flatten(1).mean(dim=1).view(-1, 2)

    model_err = per_pair_errors(model_pred)
    ref_err = per_pair_errors(ref_pred.detach())
    model_diff = model_err[:, 0] - model_err[:, 1]
    ref_diff = ref_err[:, 0] - ref_err[:, 1]
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "implicit_acc": (inside > 0).float().mean().detach(),
        "model_mse": model_err.mean().detach(),
        "ref_mse": ref_err.mean().detach(),
        "model_diff": model_diff.mean().detach(),
        "ref_diff": ref_diff.mean().detach(),
    }
    return loss, metrics
