"""What the tests need from vllm-omni that moved between the versions we support (0.27.0rc1 to 0.32.0rc1)."""

from __future__ import annotations

import torch


def diffusion_worker_vllm_config(device: torch.device, od_config):
    """The ``VllmConfig`` a diffusion worker runs under, for ``od_config`` on ``device``.

    vllm-omni 0.30 and later build it with ``vllm_omni.diffusion.vllm_config.create_diffusion_vllm_config``;
    0.27 builds it inside its diffusion worker module.
    """
    try:
        from vllm_omni.diffusion.vllm_config import create_diffusion_vllm_config
    except ImportError:
        from vllm_omni.diffusion.worker.diffusion_worker import (
            _create_diffusion_worker_vllm_config as create_diffusion_vllm_config,
        )
    return create_diffusion_vllm_config(device, od_config)
