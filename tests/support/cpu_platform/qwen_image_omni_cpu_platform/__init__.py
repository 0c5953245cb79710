"""A CPU ``OmniPlatform`` for vllm-omni, for qwen-image-omni's full-engine tests (not shipped).

vllm-omni 0.30.0 picks its platform from CUDA, ROCm, NPU, XPU and MUSA detectors, then from the
``vllm_omni.platform_plugins`` entry points; with none it falls back to ``UnspecifiedOmniPlatform``,
whose device methods raise. :func:`activate` is our entry point: it activates
:class:`CpuOmniPlatform` when ``VLLM_TARGET_DEVICE=cpu`` (which also makes vllm itself pick its
``CpuPlatform``), so nothing changes on a machine that does not ask for it.
"""

from __future__ import annotations

import os

PLATFORM = "qwen_image_omni_cpu_platform.platform.CpuOmniPlatform"
VLLM_CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"


def _cpu_requested() -> bool:
    return os.environ.get("VLLM_TARGET_DEVICE", "").lower() == "cpu"


def activate() -> str | None:
    """vllm-omni platform plugin: the CPU platform's qualified name when ``VLLM_TARGET_DEVICE=cpu``, else None."""
    return PLATFORM if _cpu_requested() else None


def activate_vllm() -> str | None:
    """vllm platform plugin: vllm's own ``CpuPlatform`` when ``VLLM_TARGET_DEVICE=cpu``, else None.

    vllm 0.30 picks its CPU platform from that variable itself; vllm 0.27 picks it only in a CPU build
    of vllm, and otherwise leaves ``UnspecifiedPlatform``, whose device methods raise.
    """
    return VLLM_CPU_PLATFORM if _cpu_requested() else None
