"""Rollout/trainer log-prob drift: our width-sized text RoPE vs the legacy ``mask.sum()`` length.

A tiny random Qwen-Image transformer (tests/support/tiny.py) rolls out a CFG pair of prompts (37/30 and
5/3 valid tokens, batch 2) with ``QwenImagePipelineWithLogProb.diffuse`` on embeddings padded to
a width W (64, 256, 1024), valid tokens first ("right") or last ("left"), under one of two rules:

- ``ours``: the transformer sizes the text RoPE table by the tensor width;
- ``legacy``: vllm-omni's ``max(mask.sum())`` per CFG branch, with the "kernel" flavour of
  ``qwen_image_omni.check.legacy`` (positions past the table stay unrotated; "native" raises).

The trainer (always ours) re-scores every SDE step with ``QwenImage.prepare_model_inputs`` +
``forward_and_sample_previous_step``. Right padding: on the embeddings re-collated without
padding (what a trainer's nested unpadding gives). Left padding: on the rollout's own tensors
(re-collating would move the valid tokens, which changes RoPE positions under any rule).

Per configuration: per-step max |Δ log-prob| over samples, and two estimates of KL(rollout ||
trainer) from the rollout's own samples, with d = log p_trainer - log p_rollout:
k3 = mean(exp(d) - 1 - d) (Schulman's unbiased, non-negative estimator) and k2 = mean(0.5 d^2).
"clip%" is the share of (sample, step) ratios exp(d) outside 1 ± 1e-4, Flow-GRPO's clip range.
Log-probs are the scheduler's, i.e. means over latent elements, as in Flow-GRPO / verl-omni.

    python benchmarks/rollout_trainer_kl.py [--seeds 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support.rl_tiny

from tests.support.rl_tiny import (  # noqa: E402
    NEGATIVE_LENGTHS,
    PROMPT_LENGTHS,
    collate,
    legacy_rope_per_call,
    make_pipeline,
    model_config,
    prompt_rows,
    recompute_log_probs,
    run_diffuse,
)

WIDTHS = (64, 256, 1024)
LAYOUTS = ("right", "left")
RULES = ("ours", "legacy")
SDE_TYPES = ("sde", "cps", "dance_sde")
CLIP_RANGE = 1e-4


def collate_pair(rows, width, layout, cfg_scale):
    """(prompt, negative) collated to ``width`` with ``layout``; no negative without CFG."""
    positive, negative = rows
    return collate(positive, width, layout), (collate(negative, width, layout) if cfg_scale > 1 else None)


def trainer_pair(rows, rollout_pair, layout, cfg_scale):
    """What the trainer scores on: unpadded re-collation (right) or the rollout's tensors (left)."""
    return collate_pair(rows, None, "right", cfg_scale) if layout == "right" else rollout_pair


def measure(pipe, rows, rule, sde_type, cfg_scale, width, layout, seeds):
    """Return ``(rollout, trainer)`` log-probs ``(seeds * B, W)`` for one configuration."""
    rollout_pair = collate_pair(rows, width, layout, cfg_scale)
    config = model_config(sde_type, cfg_scale)
    rollouts, trainers = [], []
    for seed in range(seeds):
        if rule == "legacy":
            with legacy_rope_per_call(pipe.transformer, mode="kernel"):
                _, latents, log_probs, timesteps = run_diffuse(pipe, *rollout_pair, sde_type, cfg_scale, seed=seed)
        else:
            _, latents, log_probs, timesteps = run_diffuse(pipe, *rollout_pair, sde_type, cfg_scale, seed=seed)
        prompt, negative = trainer_pair(rows, rollout_pair, layout, cfg_scale)
        rollouts.append(log_probs)
        trainers.append(recompute_log_probs(pipe.transformer, config, latents, timesteps, prompt, negative))
    return torch.cat(rollouts), torch.cat(trainers)


def stats(rollout, trainer):
    """Per-step max |Δ|, overall max, k3 and k2 KL estimates, share of clipped ratios."""
    delta = (trainer - rollout).double()
    per_step = delta.abs().amax(dim=0)
    k3 = float((delta.exp() - 1 - delta).mean())
    k2 = float((0.5 * delta**2).mean())
    clipped = float(((delta.exp() - 1).abs() > CLIP_RANGE).double().mean())
    return per_step, float(per_step.max()), k3, k2, clipped


def native_outcome(pipe, rows, width):
    """What the legacy "native" flavour does on a right-padded CFG pair."""
    try:
        with legacy_rope_per_call(pipe.transformer, mode="native"):
            run_diffuse(pipe, *collate_pair(rows, width, "right", 4.0), "sde", 4.0)
    except (RuntimeError, ValueError) as error:
        return f"raises {type(error).__name__}"
    return "runs"


def main_table(pipe, rows, seeds):
    """sde, CFG 4.0: every rule x layout x width."""
    header = (
        f"{'rule':<7} {'layout':<6} {'roll W':>6} {'train W':>7}  {'per-step max|Δlogp|':<29} "
        f"{'max':>8} {'KL k3':>9} {'KL k2':>9} {'clip%':>6}"
    )
    print("sde_type=sde, true_cfg_scale=4.0 (trainer: ours)")
    print(header)
    print("-" * len(header))
    for rule in RULES:
        for layout in LAYOUTS:
            for width in WIDTHS:
                rollout, trainer = measure(pipe, rows, rule, "sde", 4.0, width, layout, seeds)
                per_step, worst, k3, k2, clipped = stats(rollout, trainer)
                trainer_width = max(PROMPT_LENGTHS) if layout == "right" else width
                steps = " ".join(f"{value:.1e}" for value in per_step.tolist())
                print(
                    f"{rule:<7} {layout:<6} {width:>6} {trainer_width:>7}  {steps:<29} "
                    f"{worst:>8.1e} {k3:>9.1e} {k2:>9.1e} {100 * clipped:>5.0f}%"
                )
    print(f"legacy-native right 64: {native_outcome(pipe, rows, 64)}")


def sweep_table(pipe, rows, seeds):
    """Every SDE type, CFG on and off: worst case over widths and layouts, per rule."""
    header = f"{'sde_type':<10} {'cfg':>4}  {'rule':<7} {'max|Δlogp|':>10} {'worst KL k3':>11} {'clip%':>6}"
    print("\nall SDE types, worst case over widths (64, 256, 1024) and layouts (right, left)")
    print(header)
    print("-" * len(header))
    for sde_type in SDE_TYPES:
        for cfg_scale in (4.0, 1.0):
            for rule in RULES:
                results = [
                    stats(*measure(pipe, rows, rule, sde_type, cfg_scale, width, layout, seeds))
                    for width in WIDTHS
                    for layout in LAYOUTS
                ]
                worst = max(result[1] for result in results)
                k3 = max(result[2] for result in results)
                clipped = max(result[4] for result in results)
                print(f"{sde_type:<10} {cfg_scale:>4.1f}  {rule:<7} {worst:>10.1e} {k3:>11.1e} {100 * clipped:>5.0f}%")


def main() -> None:
    """Print both tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=4, help="rollouts (noise seeds) per configuration, batch 2 each")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    pipe = make_pipeline()
    rows = (prompt_rows(PROMPT_LENGTHS, seed=1), prompt_rows(NEGATIVE_LENGTHS, seed=2))
    print(f"tiny Qwen-Image transformer, 4 steps, 4x4 latent grid, batch 2 x {args.seeds} seeds, fp32 CPU\n")
    main_table(pipe, rows, args.seeds)
    sweep_table(pipe, rows, args.seeds)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
