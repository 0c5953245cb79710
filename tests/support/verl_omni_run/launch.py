"""``python -m verl_omni.trainer.main_diffusion`` on the CPU: the command line, its environment, its metrics.

The run is verl-omni's FlowGRPO recipe for Qwen-Image (``run_qwen_image_ocr_lora.sh``: LoRA, vllm-omni
rollout with ``step_execution=true``, true CFG, an SDE window of 2, ``layered_summon``, checkpoints)
shrunk to a tiny model: 2 prompts x 2 samples per step, 64x64 images, 4 denoising steps, in float32
so that rollout/trainer differences show at the fp32 noise floor.

What is there only because this machine has no GPU, each with why:

- ``VERL_PLATFORM=cpu``: verl's device calls go to the test-support CPU platform
  (``qwen_image_omni_cpu_platform.verl_platform``; verl otherwise falls back to CUDA);
- ``VERL_ENGINE_DEVICE=cuda``: verl-omni registers its FSDP diffusion engine for ``cuda`` and ``npu``
  only; this names the engine to build, which then runs on the platform's device;
- ``VLLM_TARGET_DEVICE=cpu``: vllm's CPU platform and the test-support vllm-omni CPU platform
  (``qwen_image_omni_cpu_platform``) for the rollout engine;
- ``+ray_kwargs.ray_init.num_gpus=1``: one logical Ray GPU slot, which verl's placement groups ask for;
- ``actor.strategy=fsdp2``: FSDP1 moves parameters to ``cuda:<index>``; FSDP2 uses the platform's device;
- ``rollout.free_cache_engine=false``, ``+rollout.enable_sleep_mode=false``: vllm's sleep mode needs
  CUDA's memory allocator.

``attn_backend`` stays verl-omni's default (FlashAttention 3), which verl-omni itself turns into
``native`` for the trainer and ``TORCH_SDPA`` for the rollout where FA3 cannot load, as here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
BRIDGE = "qwen_image_omni.integrations.verl_omni"
PEFT_FIX_ONLY = "tests.support.verl_omni_run.peft_fix_only"
REWARD = Path(__file__).with_name("reward.py")

LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)  # fmt: skip
"""The recipe's LoRA targets: the blocks' attention and MLP projections.

verl-omni syncs LoRA to the rollout block by block (``fsdp_layer_prefixes``, ``transformer_blocks.``),
so with ``all-linear`` the adapters of the layers outside the blocks (``img_in``, ``txt_in``, the
timestep embedder, ``norm_out``, ``proj_out``) would train but never reach the rollout.
"""

CPU_ENVIRONMENT = {
    "VERL_PLATFORM": "cpu",
    "VERL_ENGINE_DEVICE": "cuda",
    "VLLM_TARGET_DEVICE": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}
"""The run's environment besides ``PYTHONPATH`` and the metrics file (see the module docstring)."""

CPU_OVERRIDES = (
    "+ray_kwargs.ray_init.num_gpus=1",
    "ray_kwargs.ray_init.num_cpus=4",
    "+ray_kwargs.ray_init.include_dashboard=false",
    "trainer.device=cpu",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "actor_rollout_ref.rollout.free_cache_engine=false",
    "+actor_rollout_ref.rollout.enable_sleep_mode=false",
)
"""Hydra overrides that exist only because the run has no GPU (see the module docstring)."""


def recipe_overrides(inputs: dict[str, Path], external_lib: str, steps: int) -> list[str]:
    """verl-omni's Qwen-Image FlowGRPO LoRA recipe, tiny, for ``steps`` training steps."""
    return [
        f"data.train_files={inputs['train']}",
        f"data.val_files={inputs['val']}",
        "data.train_batch_size=2",
        "data.max_prompt_length=256",
        "data.seed=1",
        f"actor_rollout_ref.model.path={inputs['model']}",
        "actor_rollout_ref.model.algorithm=flow_grpo",
        f"actor_rollout_ref.model.external_lib={external_lib}",
        "actor_rollout_ref.model.lora_rank=4",
        "actor_rollout_ref.model.lora_alpha=8",
        f"actor_rollout_ref.model.target_modules=[{','.join(LORA_TARGETS)}]",
        "actor_rollout_ref.actor.optim.lr=3e-4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.fsdp_config.model_dtype=float32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        "actor_rollout_ref.rollout.name=vllm_omni",
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.rollout.seed=7",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.load_format=safetensors",
        "actor_rollout_ref.rollout.layered_summon=true",
        "actor_rollout_ref.rollout.step_execution=true",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "actor_rollout_ref.rollout.pipeline.true_cfg_scale=4.0",
        "actor_rollout_ref.rollout.pipeline.height=64",
        "actor_rollout_ref.rollout.pipeline.width=64",
        "actor_rollout_ref.rollout.pipeline.num_inference_steps=4",
        "actor_rollout_ref.rollout.pipeline.max_sequence_length=256",
        "actor_rollout_ref.rollout.algo.noise_level=1.2",
        "actor_rollout_ref.rollout.algo.sde_type=sde",
        "actor_rollout_ref.rollout.algo.sde_window_size=2",
        "actor_rollout_ref.rollout.algo.sde_window_range=[0,3]",
        "actor_rollout_ref.rollout.val_kwargs.pipeline.num_inference_steps=4",
        "actor_rollout_ref.rollout.val_kwargs.algo.noise_level=0.0",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        "reward.num_workers=1",
        f"reward.custom_reward_function.path={REWARD}",
        "reward.custom_reward_function.name=compute_score",
        "trainer.logger=[console,file]",
        # verl's Ray workers log vllm at WARN; the test reads which pipeline served from an INFO line.
        "+ray_kwargs.ray_init.runtime_env.env_vars.VLLM_LOGGING_LEVEL=INFO",
        "trainer.project_name=qwen_image_omni",
        "trainer.experiment_name=tiny_flow_grpo",
        "trainer.val_before_train=false",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        "trainer.total_epochs=1",
        f"trainer.total_training_steps={steps}",
    ]


@dataclass
class Run:
    """One finished ``main_diffusion`` process."""

    returncode: int
    log: Path
    metrics: dict[int, dict[str, float]]
    """What verl's file logger wrote: ``{step: {metric: value}}`` (steps merged when logged twice)."""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the run's output, for assertion messages."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def verl_omni_source() -> Path:
    """The folder that holds the ``verl_omni`` package in use (its source checkout)."""
    spec = importlib.util.find_spec("verl_omni")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("verl_omni is not importable: put a verl-omni checkout on PYTHONPATH")
    return Path(next(iter(spec.submodule_search_locations))).parent


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """verl's ``FileLogger`` lines (``{"step": n, "data": {...}}``), merged per step."""
    metrics: dict[int, dict[str, float]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            metrics.setdefault(int(record["step"]), {}).update(record["data"])
    return metrics


def main_diffusion(out_dir: Path, overrides: list[str], timeout_s: float) -> Run:
    """Run ``python -m verl_omni.trainer.main_diffusion`` with ``overrides`` plus the CPU ones; wait for it.

    Everything the run writes (checkpoints, Hydra's folder, the metrics file, the log) goes under ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **CPU_ENVIRONMENT,
        "PYTHONPATH": os.pathsep.join([str(verl_omni_source()), str(REPO)]),
        "VERL_FILE_LOGGER_PATH": str(out_dir / "metrics.jsonl"),
    }
    command = [
        sys.executable,
        "-m",
        "verl_omni.trainer.main_diffusion",
        *overrides,
        *CPU_OVERRIDES,
        f"trainer.default_local_dir={out_dir / 'checkpoints'}",
        f"hydra.run.dir={out_dir / 'hydra'}",
    ]
    log = out_dir / "run.log"
    with log.open("w") as output:
        # Its own session, so a run past its time is stopped with Ray's processes and the engine's.
        process = subprocess.Popen(
            command, cwd=out_dir, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = -1
    return Run(returncode=returncode, log=log, metrics=read_metrics(out_dir / "metrics.jsonl"))
