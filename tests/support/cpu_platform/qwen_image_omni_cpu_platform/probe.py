"""A vllm-omni worker extension for tests: look inside a running engine and update its weights.

Pass ``worker_extension_cls="qwen_image_omni_cpu_platform.probe.EngineProbe"`` to ``Omni`` (or
``--worker-extension-cls`` to ``vllm serve``) and call its methods with ``collective_rpc``. The weight
update is what an RL framework's worker extension does each step: diffusers-named ``transformer.*``
tensors handed to the pipeline's ``load_weights``.
"""

from __future__ import annotations

from typing import Any


class EngineProbe:
    """Methods mixed into vllm-omni's diffusion worker (``self`` is the worker)."""

    def probe_pipeline(self) -> dict[str, Any]:
        """The classes serving this engine: pipeline and transformer, as ``module.QualName``."""
        pipeline = self.model_runner.pipeline
        transformer = getattr(pipeline, "transformer", None)

        def name(obj: Any) -> str | None:
            return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"

        return {"pipeline": name(pipeline), "transformer": name(transformer)}

    def probe_load_transformer_weights(self, path: str) -> int:
        """Load a diffusers-named transformer safetensors file into the running pipeline; the tensor count."""
        from safetensors.torch import load_file

        tensors = load_file(path)
        loaded = self.model_runner.pipeline.load_weights(
            (f"transformer.{name}", tensor) for name, tensor in tensors.items()
        )
        return len(loaded)

    def probe_lora(self) -> dict[str, Any]:
        """The worker's LoRA state: the active and suspended adapter ids, the cached ids, the wrapped layers."""
        manager = getattr(self, "lora_manager", None)
        if manager is None:
            return {"active": None, "suspended": None, "registered": [], "wrapped": []}
        return {
            "active": manager._active_adapter_id,
            "suspended": manager._suspended_adapter_id,
            "registered": sorted(manager.list_adapters()),
            "wrapped": sorted(manager._lora_modules),
        }
