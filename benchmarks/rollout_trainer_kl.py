"""Rollout/trainer log-prob drift: our width-sized text RoPE vs the legacy ``mask.sum()`` length.

The package's tiny random Qwen-Image transformer (``qwen_image_omni.check.sources.tiny_source``) rolls out
a CFG pair of prompts (37/30 and 5/3 valid tokens, batch 2) with the rollout pipeline's ``rollout`` on
embeddings padded to a width W (64, 256, 1024), valid tokens first ("right") or last ("left"), under one
of two rules:

- ``ours``: the transformer sizes the text RoPE table by the tensor width;
- ``legacy``: vllm-omni's ``max(mask.sum())`` per CFG branch, with the "kernel" flavour of
  ``qwen_image_omni.check.legacy`` (positions past the table stay unrotated; "native" raises).

The trainer (always ours) re-scores every SDE step with the package's ``recompute_log_probs``
(the adapter's ``prepare_model_inputs`` + ``forward_and_sample_previous_step``). Right padding: on the embeddings re-collated without
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
import time

import torch

from qwen_image_omni import QwenImageTransformer2DModel
from qwen_image_omni.check.legacy import legacy_rope_per_call
from qwen_image_omni.check.sources import TINY_CONFIG, tiny_source
from qwen_image_omni.pipelines.config import DiffusionModelConfig
from qwen_image_omni.pipelines.qwen_image import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    ImageGeometry,
    PromptBatch,
    recompute_log_probs,
)
from qwen_image_omni.pipelines.qwen_image_flow_grpo import DiffusersQwenImagePipelineWithLogProb
from qwen_image_omni.pipelines.schedulers import FlowMatchSDEDiscreteScheduler

HEIGHT = WIDTH = 64  # pixels: a 4x4 grid of packed latent tokens
STEPS = 4
PROMPT_LENGTHS = (37, 30)  # valid tokens of the positive prompt, per sample
NEGATIVE_LENGTHS = (5, 3)  # of the negative prompt
WIDTHS = (64, 256, 1024)
LAYOUTS = ("right", "left")
RULES = ("ours", "legacy")
SDE_TYPES = ("sde", "cps", "dance_sde")
CLIP_RANGE = 1e-4


def make_pipeline() -> DiffusersQwenImagePipelineWithLogProb:
    """The rollout pipeline around the tiny transformer (no text encoder, no VAE)."""
    transformer = tiny_source().load(QwenImageTransformer2DModel, torch.float32).eval()
    scheduler = FlowMatchSDEDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    return DiffusersQwenImagePipelineWithLogProb(transformer=transformer, scheduler=scheduler)


def prompt_rows(lengths, seed):
    """Unpadded random prompt embeddings, one ``(n_i, joint_attention_dim)`` tensor per sample."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, TINY_CONFIG["joint_attention_dim"], generator=generator) for n in lengths]


def collate_pair(rows, width, layout, cfg_scale):
    """The CFG pair collated to ``width`` (None: the longest row) with ``layout``; no negative without CFG."""
    positive, negative = rows
    return PromptBatch.from_rows(positive, negative if cfg_scale > 1 else None, width, layout)


def trainer_prompts(rows, rollout_prompts, layout, cfg_scale):
    """What the trainer scores on: unpadded re-collation (right) or the rollout's tensors (left)."""
    return collate_pair(rows, None, "right", cfg_scale) if layout == "right" else rollout_prompts


def model_config(sde_type, cfg_scale):
    """The trainer's config."""
    return DiffusionModelConfig(
        architecture="QwenImagePipeline",
        algorithm="flow_grpo",
        pipeline={"height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS, "true_cfg_scale": cfg_scale},
        algo={"noise_level": 0.7, "sde_type": sde_type},
    )


def rollout(pipe, prompts, sde_type, cfg_scale, seed=0):
    """One rollout, every step but the last in the SDE window; ``(all_latents, all_log_probs, all_timesteps)``."""
    with torch.no_grad():
        _, all_latents, all_log_probs, all_timesteps, _ = pipe.rollout(
            prompts,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(seed),
            true_cfg_scale=cfg_scale,
            sde_type=sde_type,
        )
    return all_latents, all_log_probs, all_timesteps


def measure(pipe, rows, rule, sde_type, cfg_scale, width, layout, seeds):
    """Return ``(rollout, trainer)`` log-probs ``(seeds * B, W)`` for one configuration."""
    rollout_prompts = collate_pair(rows, width, layout, cfg_scale)
    config = model_config(sde_type, cfg_scale)
    micro_batch = ImageGeometry(HEIGHT, WIDTH, pipe.vae_scale_factor).micro_batch()
    rollouts, trainers = [], []
    for seed in range(seeds):
        if rule == "legacy":
            with legacy_rope_per_call(pipe.transformer, mode="kernel"):
                latents, log_probs, timesteps = rollout(pipe, rollout_prompts, sde_type, cfg_scale, seed)
        else:
            latents, log_probs, timesteps = rollout(pipe, rollout_prompts, sde_type, cfg_scale, seed)
        rollouts.append(log_probs)
        with torch.no_grad():
            prompts = trainer_prompts(rows, rollout_prompts, layout, cfg_scale)
            trainers.append(recompute_log_probs(pipe.transformer, config, latents, timesteps, prompts, micro_batch))
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
            rollout(pipe, collate_pair(rows, width, "right", 4.0), "sde", 4.0)
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
    print(f"tiny Qwen-Image transformer, {STEPS} steps, 4x4 latent grid, batch 2 x {args.seeds} seeds, fp32 CPU\n")
    main_table(pipe, rows, args.seeds)
    sweep_table(pipe, rows, args.seeds)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
