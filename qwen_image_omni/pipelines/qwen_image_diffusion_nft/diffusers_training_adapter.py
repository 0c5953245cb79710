"""Qwen-Image DiffusionNFT training adapter: forward-process inputs and the (true-CFG) prediction.

DiffusionNFT trains on the forward process: the trainer noises the rollout's clean latent to
``x_t`` at a chosen timestep (:func:`~..losses.diffusion_nft.forward_process_sample`) and asks the model for the
velocity there, once with the trained policy, once with the old one and once with the reference
(:func:`~..losses.diffusion_nft.diffusion_nft_loss`). :class:`QwenImageDiffusionNFT` builds those inputs and that
prediction; scheduler set-up and the step functions the ODE rollout runs are FlowGRPO's
:class:`~..qwen_image_flow_grpo.diffusers_training_adapter.QwenImage`. The semantics are verl-omni
main's ``QwenImageDiffusionNFT``.
"""

from __future__ import annotations

from typing import Any

import torch

from ...models import QwenImageTransformer2DModel
from ..checks import check_int
from ..config import DiffusionModelConfig
from ..model_base import DiffusionModelBase
from ..qwen_image import apply_true_cfg
from ..qwen_image_flow_grpo.diffusers_training_adapter import QwenImage

__all__ = ["QwenImageDiffusionNFT"]


@DiffusionModelBase.register("QwenImagePipeline", algorithm="diffusion_nft")
class QwenImageDiffusionNFT(QwenImage):
    """Training adapter for Qwen-Image with DiffusionNFT (``("QwenImagePipeline", "diffusion_nft")``).

    - :meth:`prepare_model_inputs` takes one noised latent ``x_t`` ``(B, S, C)`` and its ``(B,)``
      timesteps (not a trajectory) and builds FlowGRPO's transformer inputs for them, plus the
      negative prompt's when negative embeddings are given;
    - :meth:`forward` gives the velocity prediction, with Qwen-Image's true CFG
      (:func:`apply_true_cfg`) when ``pipeline.true_cfg_scale > 1`` and negative inputs are given.

    The ODE rollout (:class:`~.diffusers_rollout_pipeline.QwenImageDiffusionNFTPipeline`) predicts
    through :meth:`predict_noise`, which shares :meth:`forward`'s guided prediction, so the trainer
    reproduces the rollout's predictions at the rollout's states.
    """

    @classmethod
    def prepare_model_inputs(
        cls,
        module: QwenImageTransformer2DModel,
        model_config: DiffusionModelConfig,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_embeds_mask: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds_mask: torch.Tensor | None,
        micro_batch: Any,
        step: int,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Transformer keyword arguments at a noised latent (and those of the negative prompt).

        ``hidden_states = latents`` (cast to the module's dtype) and ``timestep = timesteps / 1000``;
        prompt embeddings go in at whatever width they have. The image geometry comes from the micro-batch's ``height`` / ``width`` /
        ``vae_scale_factor`` (dict or TensorDict, tensor or non-tensor data), else from
        ``model_config.pipeline`` and 8.

        Args:
            module: the Qwen-Image transformer.
            model_config: provides the ``pipeline.height`` / ``width`` / ``guidance_scale`` fallbacks.
            latents: ``(B, S, C)`` noised packed latents ``x_t``.
            timesteps: ``(B,)`` scheduler timesteps in ``[0, 1000]`` (float or the trainer's long ones).
            prompt_embeds: ``(B, L, D)`` positive prompt embeddings.
            prompt_embeds_mask: ``(B, L)`` 1 for valid tokens, or None (all valid).
            negative_prompt_embeds: ``(B, L', D)`` negative prompt embeddings, or None.
            negative_prompt_embeds_mask: ``(B, L')`` their mask, or None.
            micro_batch: mapping with the optional image metadata above.
            step: index of the training timestep in the micro-batch's ``train_timesteps``; the
                caller has already selected ``timesteps``, so it is only checked to be an int >= 0.

        Returns:
            ``(model_inputs, negative_model_inputs)``; the second is None without negative embeddings.

        Raises:
            TypeError: ``latents`` / ``timesteps`` not tensors, ``step`` not an int.
            ValueError: ``latents`` not ``(B, S, C)`` (a ``(B, T, S, C)`` trajectory included),
                ``timesteps`` not ``(B,)``, mismatched prompt shapes or image geometry.
        """
        for name, value in (("latents", latents), ("timesteps", timesteps)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
        if latents.ndim != 3:
            raise ValueError(
                f"`latents` must be the noised latents x_t, (batch, image tokens, channels), got shape "
                f"{tuple(latents.shape)}; DiffusionNFT trains on forward-process samples, not trajectories"
            )
        if tuple(timesteps.shape) != (latents.shape[0],):
            raise ValueError(
                f"`timesteps` must be (batch,) = ({latents.shape[0]},), one per noised latent, "
                f"got shape {tuple(timesteps.shape)}"
            )
        check_int("`step`", step, 0)
        # The already-selected (B, S, C) / (B,) tensors are used as they are at step 0.
        return super().prepare_model_inputs(
            module,
            model_config,
            latents,
            timesteps,
            prompt_embeds,
            prompt_embeds_mask,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            micro_batch,
            0,
        )

    @classmethod
    def forward(
        cls,
        module: QwenImageTransformer2DModel,
        model_config: DiffusionModelConfig | None,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The velocity prediction at ``model_inputs``; true CFG when it applies.

        With ``model_config.pipeline.true_cfg_scale > 1`` and ``negative_model_inputs`` given, the
        negative prompt is run too and the two are combined by :func:`apply_true_cfg`; otherwise (a
        scale <= 1, or no negative inputs) the positive prediction alone, as verl-omni's adapter.

        Raises:
            ValueError: negative inputs are given but no ``model_config`` to read the scale from.
        """
        if negative_model_inputs is None:
            return module(**model_inputs)[0]
        if model_config is None:
            raise ValueError(
                "`model_config` (its pipeline.true_cfg_scale) is needed with `negative_model_inputs`, got None"
            )
        return cls._guided_prediction(module, model_inputs, negative_model_inputs, model_config.pipeline.true_cfg_scale)

    @classmethod
    def predict_noise(
        cls,
        module: QwenImageTransformer2DModel,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None,
        true_cfg_scale: float,
        model_config: DiffusionModelConfig | None = None,
    ) -> torch.Tensor:
        """The rollout's prediction: :meth:`forward`'s guided prediction at ``true_cfg_scale``.

        Raises:
            ValueError: ``true_cfg_scale > 1`` and ``negative_model_inputs`` is None.
        """
        if true_cfg_scale > 1.0 and negative_model_inputs is None:
            raise ValueError(
                f"true_cfg_scale={true_cfg_scale} > 1 needs `negative_model_inputs` "
                "(from negative prompt embeddings), got None"
            )
        return cls._guided_prediction(module, model_inputs, negative_model_inputs, true_cfg_scale)

    @staticmethod
    def _guided_prediction(
        module: QwenImageTransformer2DModel,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None,
        true_cfg_scale: float,
    ) -> torch.Tensor:
        """One prediction per prompt, combined with true CFG when ``true_cfg_scale > 1`` and negatives exist."""
        prediction = module(**model_inputs)[0]
        if true_cfg_scale <= 1.0 or negative_model_inputs is None:
            return prediction
        negative_prediction = module(**negative_model_inputs)[0]
        return apply_true_cfg(prediction, negative_prediction, true_cfg_scale)
