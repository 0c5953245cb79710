"""A CPU platform for verl, so verl-omni's trainer (FSDP workers, its rollout server) runs without a GPU.

Test support only (never shipped): ``make test-verl-omni`` installs it beside verl.

verl routes every device call through ``verl.plugin.platform.get_platform()``, which picks
``VERL_PLATFORM`` or the first platform that finds its hardware and otherwise falls back to CUDA.
Importing this module (verl's ``verl.plugins`` entry point does, in every process that imports verl)
registers :class:`PlatformCPU` as ``"cpu"``; ``VERL_PLATFORM=cpu`` selects it, so nothing changes
in a process that does not ask for it.

The device is the CPU; collectives use gloo; Ray schedules workers on logical ``"GPU"`` resources,
which the run declares with ``ray_init.num_gpus`` (one per worker rank), so verl's placement groups
keep their GPU-per-rank layout.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace
from typing import Any

import psutil
import torch
import torch.distributed
from verl.plugin.platform import PlatformBase, PlatformRegistry


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def _resident_bytes(*args: Any, **kwargs: Any) -> int:
    return psutil.Process().memory_info().rss


def _memory_info(*args: Any, **kwargs: Any) -> tuple[int, int]:
    memory = psutil.virtual_memory()
    return memory.available, memory.total


CPU_DEVICE_MODULE = SimpleNamespace(
    __name__="qwen_image_omni_cpu_platform.verl_platform.CPU_DEVICE_MODULE",
    is_available=lambda: True,
    current_device=lambda: "cpu",
    device_count=lambda: 1,
    set_device=_no_op,
    synchronize=_no_op,
    empty_cache=_no_op,
    manual_seed=torch.manual_seed,
    manual_seed_all=torch.manual_seed,
    get_rng_state=torch.get_rng_state,
    set_rng_state=torch.set_rng_state,
    get_device_name=lambda *args: "cpu",
    memory_allocated=_resident_bytes,
    memory_reserved=_resident_bytes,
    max_memory_allocated=_resident_bytes,
    max_memory_reserved=_resident_bytes,
    reset_peak_memory_stats=_no_op,
    mem_get_info=_memory_info,
    ipc_collect=_no_op,
    Stream=torch.cpu.Stream,
    stream=torch.cpu.stream,
    current_stream=torch.cpu.current_stream,
    Event=torch.cpu.Event,
    is_initialized=lambda: True,
)
"""What verl calls on ``get_torch_device()``, answered for the CPU (memory figures are this process's RSS)."""


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """verl's platform interface on the CPU: device ``"cpu"``, gloo, logical Ray ``"GPU"`` slots."""

    @property
    def device_name(self) -> str:
        """torch's device type."""
        return "cpu"

    @property
    def vendor_name(self) -> str:
        """No accelerator vendor."""
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        """:data:`CPU_DEVICE_MODULE`."""
        return CPU_DEVICE_MODULE  # type: ignore[return-value]

    def is_available(self) -> bool:
        """The CPU is always there."""
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        """Only when asked for by name (``VERL_PLATFORM=cpu``): never auto-detected."""
        return False

    def current_device(self) -> str:
        """``"cpu"``: verl hands this to ``.to()`` and ``torch.device()``, where an int index means a CUDA device."""
        return "cpu"

    def device_count(self) -> int:
        """One device."""
        return 1

    def set_device(self, device_index: int) -> None:
        """Nothing to select."""

    def synchronize(self, device_index: int | None = None) -> None:
        """CPU work is synchronous."""

    def manual_seed(self, seed: int) -> None:
        """torch's CPU generator."""
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        """torch's CPU generator."""
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        """No device allocator."""

    def empty_cache(self) -> None:
        """No device cache."""

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        """No compute capability."""
        return None, None

    def communication_backend_name(self) -> str:
        """gloo, torch's CPU collectives."""
        return "gloo"

    def visible_devices_envvar(self) -> str:
        """The variable Ray sets for its logical GPU slots (read, never acted on)."""
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        """No profiler ranges."""
        yield

    def profiler_start(self) -> None:
        """No device profiler."""

    def profiler_stop(self) -> None:
        """No device profiler."""

    def get_device_uuid(self, device_id: Any) -> str:
        """One CPU device on this host."""
        return "CPU-0"

    def ray_resource_name(self) -> str:
        """Ray's logical ``"GPU"`` resource, declared by ``ray_init.num_gpus``."""
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        """As CUDA's."""
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        """No CUDA IPC handles: weights go by value."""
        return False

    def cudart(self) -> Any:
        """No CUDA runtime."""
        return None


def _one_entry_per_device(init_process_group):
    """``init_process_group`` that drops repeated ``device:backend`` entries from the backend string.

    verl asks for ``f"cpu:gloo,{device}:{backend}"``; on this platform that is ``"cpu:gloo,cpu:gloo"``,
    which torch refuses as a duplicate device type. The one entry left means the same thing.
    """

    @functools.wraps(init_process_group)
    def wrapper(backend: str | None = None, *args: Any, **kwargs: Any):
        if isinstance(backend, str) and "," in backend:
            backend = ",".join(dict.fromkeys(part.strip() for part in backend.split(",")))
        return init_process_group(backend, *args, **kwargs)

    wrapper.qwen_image_omni_cpu_platform = True
    return wrapper


if not getattr(torch.distributed.init_process_group, "qwen_image_omni_cpu_platform", False):
    torch.distributed.init_process_group = _one_entry_per_device(torch.distributed.init_process_group)


_RECEIVER_MODULE = "verl.workers.rollout.vllm_rollout.bucketed_weight_transfer"


def _copying_receive_weights(receive_weights):
    """``BucketedWeightReceiver.receive_weights`` that hands the callback copies when the device is the CPU.

    The receiver views each bucket in the shared-memory buffer and calls ``tensor.to(device)``: on a GPU
    that copies, on the CPU it returns the view itself. The callback would then keep views that the
    next bucket overwrites (verl-omni accumulates LoRA tensors across buckets), and closing the buffer
    fails with ``BufferError: cannot close exported pointers exist``. The copy restores the GPU semantics.
    """

    @functools.wraps(receive_weights)
    def wrapper(self, on_bucket_received):
        if not self.use_shm or torch.device(self.device).type != "cpu":
            return receive_weights(self, on_bucket_received)
        return receive_weights(self, lambda weights: on_bucket_received([(n, t.clone()) for n, t in weights]))

    return wrapper


class _PatchReceiverOnImport(importlib.abc.MetaPathFinder):
    """Applies :func:`_copying_receive_weights` when verl's weight-transfer module is imported.

    Importing that module here would pull vllm into every process that imports verl, and could run
    while ``verl/__init__`` itself is still loading (verl loads this plugin from there).
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != _RECEIVER_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            receiver = module.BucketedWeightReceiver
            receiver.receive_weights = _copying_receive_weights(receiver.receive_weights)

        spec.loader.exec_module = exec_and_patch
        return spec


if _RECEIVER_MODULE in sys.modules:
    _receiver = sys.modules[_RECEIVER_MODULE].BucketedWeightReceiver
    _receiver.receive_weights = _copying_receive_weights(_receiver.receive_weights)
elif not any(isinstance(finder, _PatchReceiverOnImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _PatchReceiverOnImport())
