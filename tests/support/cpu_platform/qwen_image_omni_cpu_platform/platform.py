"""The CPU platform: vllm's ``CpuPlatform`` for the engine, vllm-omni's ``OmniPlatform`` for diffusion."""

from __future__ import annotations

import psutil
import torch
from vllm.platforms.cpu import CpuPlatform
from vllm_omni.platforms.interface import OmniPlatform, OmniPlatformEnum


class CpuOmniPlatform(OmniPlatform, CpuPlatform):
    """Runs vllm-omni's diffusion worker on the CPU: device "cpu", gloo, SDPA attention, psutil memory."""

    _omni_enum = OmniPlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    @classmethod
    def get_torch_device(cls, local_rank: int | None = None) -> torch.device:
        """Every rank runs on the CPU."""
        return torch.device("cpu")

    @classmethod
    def get_device_count(cls) -> int:
        """One "device": the CPU."""
        return 1

    @classmethod
    def get_device_version(cls) -> str | None:
        """No device runtime version on the CPU."""
        return None

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        """Nothing to select on the CPU."""

    @classmethod
    def synchronize(cls) -> None:
        """CPU work is synchronous."""

    @classmethod
    def empty_cache(cls) -> None:
        """No device cache to empty."""

    @classmethod
    def reset_peak_memory_stats(cls, device: torch.device | None = None) -> None:
        """No allocator statistics on the CPU."""

    @classmethod
    def max_memory_allocated(cls, device: torch.device | None = None) -> int:
        """This process's resident memory in bytes (the CPU has no allocator peak to read)."""
        return psutil.Process().memory_info().rss

    @classmethod
    def max_memory_reserved(cls, device: torch.device | None = None) -> int:
        """Same figure as :meth:`max_memory_allocated`."""
        return psutil.Process().memory_info().rss

    @classmethod
    def get_current_memory_usage(cls, device: torch.device | None = None) -> float:
        """This process's resident memory in bytes (vllm 0.27's ``CpuPlatform`` does not answer this)."""
        return float(psutil.Process().memory_info().rss)

    @classmethod
    def memory_allocated(cls, device: torch.device | None = None) -> int:
        """Same figure as :meth:`max_memory_allocated`."""
        return psutil.Process().memory_info().rss

    @classmethod
    def get_device_capability(cls, device_id: int = 0) -> None:
        """No compute capability on the CPU."""
        return None

    @classmethod
    def get_free_memory(cls, device: torch.device | None = None) -> int:
        """Available system memory in bytes."""
        return psutil.virtual_memory().available

    @classmethod
    def get_device_memory(cls, device: torch.device | None = None) -> tuple[int, int]:
        """``(free, total)`` system memory in bytes."""
        memory = psutil.virtual_memory()
        return memory.available, memory.total

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        """Total system memory in bytes."""
        return psutil.virtual_memory().total

    @classmethod
    def supports_torch_inductor(cls) -> bool:
        """Inductor compiles for the CPU."""
        return True

    @classmethod
    def get_diffusion_attn_backend_cls(
        cls, selected_backend: str | None, head_size: int, allow_trtllm_default: bool = False
    ) -> str:
        """vllm-omni's TORCH_SDPA diffusion backend, dispatched for the CPU (the only one that runs here)."""
        if selected_backend is not None and selected_backend.upper() != "TORCH_SDPA":
            raise ValueError(
                f"the CPU platform runs the TORCH_SDPA diffusion attention backend only, got {selected_backend!r}"
            )
        return "qwen_image_omni_cpu_platform.attention.CpuSDPABackend"

    @classmethod
    def get_omni_ar_worker_cls(cls) -> str:
        """vllm-omni's GPU AR worker class path (unused by diffusion-only stages)."""
        return "vllm_omni.worker.gpu_ar_worker.GPUARWorker"

    @classmethod
    def get_omni_generation_worker_cls(cls) -> str:
        """vllm-omni's GPU generation worker class path (unused by diffusion-only stages)."""
        return "vllm_omni.worker.gpu_generation_worker.GPUGenerationWorker"

    @classmethod
    def get_default_stage_config_path(cls) -> str:
        """vllm-omni's own stage configs (``vllm_omni/deploy``, as on CUDA)."""
        return "vllm_omni/deploy"
