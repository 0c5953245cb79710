"""vllm-omni's full engine on the CPU, for the ``vllm_omni_engine`` tests.

Each job runs in a fresh process (``tests/support/engine_job.py``): the plugin registry, the
platform and the engine's worker processes are per process, and a test compares an engine with
our plugin against the same engine without it. The CPU platform comes from the test-support
package ``tests/support/cpu_platform`` (``make test-vllm-omni`` installs it); ``VLLM_PLUGINS=cpu``
loads that platform plugin alone, which leaves vllm-omni on its own Qwen-Image transformer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE_TIMEOUT_S = 600


OURS = {
    "pipeline": "qwen_image_omni.integrations.vllm_omni.pipelines.QwenImagePipeline",
    "transformer": "qwen_image_omni.models.transformer_qwenimage.QwenImageTransformer2DModel",
}
"""What ``probe_pipeline`` answers for a text-to-image engine that serves our transformer."""
VLLM_OMNI_OWN = {
    "pipeline": "vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image.QwenImagePipeline",
    "transformer": "vllm_omni.diffusion.models.qwen_image.qwen_image_transformer.QwenImageTransformer2DModel",
}
"""What ``probe_pipeline`` answers for a text-to-image engine on vllm-omni's own transformer."""


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def one_rank_vllm_world() -> Iterator[None]:
    """Inside: a one-rank gloo ``torch.distributed`` world with vllm-omni's model-parallel groups.

    What a vllm-omni worker has before it builds a pipeline (vllm parameters read the TP rank).
    """
    import torch
    from vllm_omni.diffusion.distributed import parallel_state

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASTER_ADDR", "127.0.0.1")
        patch.setenv("MASTER_PORT", str(free_port()))
        torch.distributed.init_process_group("gloo", init_method="env://", world_size=1, rank=0)
        parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
        parallel_state.initialize_model_parallel()
        try:
            yield
        finally:
            parallel_state.destroy_distributed_env()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def engine_env(*, plugin: bool) -> dict[str, str]:
    """The environment of an engine process on the CPU platform, with or without our plugin."""
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("VLLM_PLUGINS", None)
    if not plugin:
        env["VLLM_PLUGINS"] = "cpu"
    return env


def run_engine_job(job_dir: Path, job: dict, *, plugin: bool = True, env: dict | None = None) -> dict:
    """Run ``job`` (see ``tests/support/engine_job.py``) in ``job_dir``; its results and images.

    Returns ``{"steps": [...], "images": {step index: uint8 (N, H, W, 3)}, "log": str}``. A job
    that fails fails the test with the end of its log.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "job.json").write_text(json.dumps(job))
    process = subprocess.run(
        [sys.executable, "-m", "tests.support.engine_job", str(job_dir)],
        cwd=REPO,
        env={**engine_env(plugin=plugin), **(env or {})},
        capture_output=True,
        text=True,
        timeout=ENGINE_TIMEOUT_S,
    )
    log = process.stdout + process.stderr
    (job_dir / "engine.log").write_text(log)
    if process.returncode != 0:
        pytest.fail(f"engine job in {job_dir} exited with {process.returncode}:\n{log[-6000:]}")
    steps = json.loads((job_dir / "result.json").read_text())
    images = {index: np.load(job_dir / f"step{index}.npy") for index, step in enumerate(steps) if "images" in step}
    return {"steps": steps, "images": images, "log": log}


def has_cpu_platform() -> bool:
    """Whether the test-support CPU platform package is installed."""
    try:
        import qwen_image_omni_cpu_platform  # noqa: F401
    except ImportError:
        return False
    return True
