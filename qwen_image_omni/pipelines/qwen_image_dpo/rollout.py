"""The Qwen-Image DPO rollout: FlowGRPO's rollout loop as a deterministic ODE, shared by both rollout pipelines.

A DPO rollout only has to produce images and the clean latents the trainer re-noises; it samples no
SDE step and computes no log-probability. :class:`QwenImageDPORolloutMixin` runs
:class:`~..qwen_image.rollout.QwenImageRolloutMixin`'s loop (the trainer's own step functions) at
noise level 0 everywhere, i.e. the flow-matching Euler ODE of diffusers' ``QwenImagePipeline``.
"""

from __future__ import annotations

from typing import Any

from ..checks import check_int
from ..qwen_image import PromptBatch

__all__ = ["CLEAN_LATENTS_KEY", "SDE_ROLLOUT_OPTIONS", "QwenImageDPORolloutMixin", "ode_rollout_options"]

CLEAN_LATENTS_KEY = "latents_clean"
"""Key of the final packed latents in ``metadata["rl"]``: verl-omni main's DPO rollout and trainer use it."""

SDE_ROLLOUT_OPTIONS: tuple[str, ...] = ("noise_level", "sde_window_size", "sde_window_range", "sde_type", "logprobs")
"""The FlowGRPO rollout options a DPO rollout fixes (see :func:`ode_rollout_options`)."""


def ode_rollout_options(num_inference_steps: int) -> dict[str, Any]:
    """FlowGRPO's rollout options that make its loop the deterministic ODE of an ``N``-step schedule.

    Noise level 0 (every step is an Euler step), no log-probs, and the one-step window on the last
    step: the loop records a window, and that one holds ``(x_{N-1}, x_N)`` with ``x_N`` the clean
    latents, so the trajectory stays two states per sample.

    Raises:
        TypeError, ValueError: ``num_inference_steps`` is not an int >= 1.
    """
    steps = check_int("`num_inference_steps`", num_inference_steps, 1)
    return {
        "noise_level": 0.0,
        "sde_window_size": 1,
        "sde_window_range": (steps - 1, steps),
        "sde_type": "sde",
        "logprobs": False,
    }


class QwenImageDPORolloutMixin:
    """Makes a Qwen-Image FlowGRPO rollout pipeline the DPO one: its loop run as a deterministic ODE.

    Put it before the FlowGRPO pipeline class in the bases. :meth:`start_rollout` replaces whatever SDE
    options it gets with :func:`ode_rollout_options`; the steps still run FlowGRPO's
    ``QwenImage.prepare_model_inputs`` / ``predict_noise``, which :class:`~.QwenImageDPO` (the
    trainer's adapter) runs too, so rollout and trainer predict the same velocity.
    """

    algorithm: str = "dpo"
    """The registry algorithm of this pipeline (``DiffusionModelConfig.algorithm``)."""

    def start_rollout(
        self,
        prompts: PromptBatch,
        *,
        num_inference_steps: int = 50,
        **kwargs: Any,
    ) -> Any:
        """FlowGRPO's ``start_rollout`` with :func:`ode_rollout_options` in place of the SDE options.

        ``rollout`` (and vllm-omni's step execution) start here, so the whole run is the ODE: the
        clean latents ``(B, S, C)``, the last step's states ``(B, 2, S, C)`` and timestep ``(B, 1)``.

        Args:
            prompts: the encoded prompts, as ``QwenImageRolloutMixin.start_rollout``.
            num_inference_steps: number of denoising steps N.
            **kwargs: the other arguments of ``QwenImageRolloutMixin.start_rollout``; any of
                :data:`SDE_ROLLOUT_OPTIONS` among them is replaced.

        Returns:
            The ``RolloutRun`` at step 0.
        """
        kwargs.update(ode_rollout_options(num_inference_steps))
        return super().start_rollout(prompts, num_inference_steps=num_inference_steps, **kwargs)
