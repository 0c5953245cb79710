"""Stochastic reverse steps with log-probabilities for flow-matching RL (Flow-GRPO, CPS, DanceGRPO).

``FlowMatchSDEDiscreteScheduler`` is diffusers' ``FlowMatchEulerDiscreteScheduler`` (same config,
same ``set_timesteps``, loadable from a pipeline's ``scheduler/`` folder) whose ``step`` draws
``x_{t-1} ~ N(mean, std^2)`` instead of taking the Euler step, and reports the log-probability of
the transition. Rollouts call ``step`` in the denoising loop; trainers call
``sample_previous_step`` with the rollout's ``prev_sample`` and per-sample timesteps to recompute
that log-probability under the current policy. Interface of verl-omni's
``verl_omni.pipelines.schedulers.flow_match_sde``.

Notation: x the sample, v the model output (velocity), sigma = sigmas[i], sigma' = sigmas[i + 1],
dt = sigma' - sigma <= 0, eta the noise level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..checks import check_noise_level

SDEType = Literal["sde", "cps", "dance_sde"]
SDE_TYPES: tuple[str, ...] = ("sde", "cps", "dance_sde")


@dataclass
class FlowMatchSDEDiscreteSchedulerOutput(BaseOutput):
    """Output of :meth:`FlowMatchSDEDiscreteScheduler.step`.

    Args:
        prev_sample: ``(B, ...)`` sample of the previous timestep, the next model input.
        log_prob: ``(B,)`` log-probability of ``prev_sample`` (mean over all non-batch dimensions),
            or ``None`` when it was not requested.
        prev_sample_mean: ``(B, ...)`` mean of the Gaussian ``prev_sample`` was drawn from.
        std_dev_t: ``(B, 1, ..., 1)`` the step's noise scale (for ``"sde"`` the noise std is
            ``std_dev_t * sqrt(-dt)``; for ``"cps"`` and ``"dance_sde"`` it is ``std_dev_t``).
    """

    prev_sample: torch.FloatTensor
    log_prob: torch.FloatTensor | None
    prev_sample_mean: torch.FloatTensor
    std_dev_t: torch.FloatTensor


class Transition(NamedTuple):
    """One reverse step as a Gaussian: ``prev ~ N(mean, noise_std^2)``; ``std_dev_t`` is what is reported."""

    mean: torch.Tensor
    std_dev_t: torch.Tensor
    noise_std: torch.Tensor


def sde_transition(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    sigma_max: torch.Tensor,
) -> Transition:
    """Flow-GRPO SDE step: ``s = eta * sqrt(sigma / (1 - sigma~))``, noise std ``s * sqrt(-dt)``.

    ``sigma~`` is ``sigma_max`` (the schedule's second sigma) where ``sigma == 1``, else ``sigma``.
    """
    sigma_tilde = torch.where(sigma == 1, sigma_max, sigma)
    if bool((sigma_tilde >= 1).any()):
        raise ValueError(
            "sde_type='sde' needs sigma < 1 (or sigmas[1] < 1 where sigma == 1);"
            " this schedule gives an infinite noise scale"
        )
    dt = sigma_next - sigma
    std_dev_t = noise_level * torch.sqrt(sigma / (1 - sigma_tilde))
    # k = s^2 / sigma, written without the division so a sigma == 0 step (the identity) stays finite.
    k = noise_level**2 / (1 - sigma_tilde)
    mean = sample * (1 + k * dt / 2) + model_output * (1 + k * (1 - sigma) / 2) * dt
    return Transition(mean, std_dev_t, std_dev_t * torch.sqrt(-dt))


def cps_transition(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
) -> Transition:
    """Coefficients-preserving step: re-noise the predicted x0 to sigma', noise std ``sigma' * sin(eta * pi / 2)``."""
    std_dev_t = sigma_next * math.sin(noise_level * math.pi / 2)
    pred_original_sample = sample - sigma * model_output
    noise_estimate = sample + (1 - sigma) * model_output
    # Rounding can push sigma'^2 - s^2 a hair below zero when eta is close to 1.
    noise_coefficient = torch.sqrt((sigma_next**2 - std_dev_t**2).clamp(min=0))
    mean = (1 - sigma_next) * pred_original_sample + noise_coefficient * noise_estimate
    return Transition(mean, std_dev_t, std_dev_t)


def dance_sde_transition(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
) -> Transition:
    """DanceGRPO step: Euler plus the score correction ``eta^2 / (2 sigma) * x1 * dt``, std ``eta * sqrt(-dt)``."""
    dt = sigma_next - sigma
    noise_estimate = sample + (1 - sigma) * model_output
    # A sigma == 0 step has dt == 0 (the identity); divide by 1 there instead of producing 0 / 0.
    safe_sigma = torch.where(sigma == 0, torch.ones_like(sigma), sigma)
    mean = sample + dt * model_output + noise_level**2 / (2 * safe_sigma) * noise_estimate * dt
    std_dev_t = noise_level * torch.sqrt(-dt)
    return Transition(mean, std_dev_t, std_dev_t)


def gaussian_log_prob(
    value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, include_normalizer: bool
) -> torch.Tensor:
    """Elementwise ``log N(value; mean, std^2)``, without ``-log std - log sqrt(2 pi)`` unless ``include_normalizer``.

    Where ``std == 0`` the transition is deterministic and has no density: those entries are 0
    (finite, and constant so no gradient flows), never NaN or inf.
    """
    deterministic = std == 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    log_prob = -((value - mean) ** 2) / (2 * safe_std**2)
    if include_normalizer:
        log_prob = log_prob - torch.log(safe_std) - math.log(math.sqrt(2 * math.pi))
    return torch.where(deterministic, torch.zeros_like(log_prob), log_prob)


def cps_log_prob(value: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """CPS scores a sample by its negative squared distance to the mean: no variance, no normalizer."""
    return -((value - mean) ** 2)


def _check_fp32(**tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor is not None and tensor.dtype != torch.float32:
            raise TypeError(f"`{name}` must be float32 (log-probabilities are computed in fp32), got {tensor.dtype}")


def _check_same_shape(sample: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != sample.shape:
            raise ValueError(f"`{name}` has shape {tuple(tensor.shape)}, `sample` has {tuple(sample.shape)}")


def _reject_integer_timestep(timestep: object) -> None:
    is_integer = isinstance(timestep, int) or (
        isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()
    )
    if is_integer:
        raise ValueError(
            "Passing integer indices (e.g. from `enumerate(timesteps)`) as `timestep` is not supported;"
            " pass values taken from `scheduler.timesteps`."
        )


def check_generator(
    generator: torch.Generator | list[torch.Generator] | None, batch_size: int
) -> torch.Generator | list[torch.Generator] | None:
    """Return ``generator`` if it is None, a ``torch.Generator`` or a list of one per sample.

    Raises:
        TypeError: anything else, or a list holding something that is not a ``torch.Generator``.
        ValueError: a list whose length is not ``batch_size`` (diffusers' pipelines reject it too).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if not isinstance(generator, (list, tuple)):
        raise TypeError(f"`generator` must be a torch.Generator, a list of them or None, got {type(generator).__name__}")
    if len(generator) != batch_size:
        raise ValueError(
            f"`generator` must be a single torch.Generator or a list of one per sample ({batch_size}), "
            f"got a list of {len(generator)}"
        )
    wrong = [type(item).__name__ for item in generator if not isinstance(item, torch.Generator)]
    if wrong:
        raise TypeError(f"`generator` must be a list of torch.Generator, got one holding {wrong[0]}")
    return list(generator)


class FlowMatchSDEDiscreteScheduler(FlowMatchEulerDiscreteScheduler):
    """SDE version of diffusers' ``FlowMatchEulerDiscreteScheduler`` for Flow-GRPO-style RL.

    Same config and ``set_timesteps`` as the Euler scheduler, so a pipeline's
    ``scheduler/scheduler_config.json`` loads with ``from_pretrained``. ``step`` and
    ``sample_previous_step`` take a stochastic reverse step (``sde_type`` ``"sde"`` (Flow-GRPO),
    ``"cps"`` or ``"dance_sde"``) and return the log-probability of the sample they produce or
    are given. With ``noise_level == 0`` the step is the Euler step. ``stochastic_sampling`` and
    the ``s_*`` arguments of the Euler scheduler are accepted and ignored.

    Deterministic steps (noise std 0: ``noise_level == 0``, a ``sigma == 0`` step, or ``"cps"``
    into ``sigma' == 0``) return ``prev_sample == prev_sample_mean``; their log-prob is 0 for
    ``"sde"`` / ``"dance_sde"`` (no density exists) and ``-(prev - mean)^2`` for ``"cps"``: finite
    values that a rollout loop may request outside its SDE window, not training signal.
    """

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
        noise_level: float = 0.7,
        prev_sample: torch.FloatTensor | None = None,
        sde_type: SDEType = "sde",
        return_logprobs: bool = True,
        include_logprob_normalizer: bool = True,
    ) -> FlowMatchSDEDiscreteSchedulerOutput | tuple:
        """Take one stochastic reverse step from ``sample`` (the denoising-loop entry point).

        A scalar ``timestep`` (float or 0-d tensor from ``scheduler.timesteps``) works like
        diffusers: it initialises the internal step index on the first call, the step index picks
        sigma, and it advances by one. A ``(B,)`` tensor is looked up per sample in
        ``scheduler.timesteps`` (samples may be at different steps) and leaves the step index alone.
        The other arguments are those of :meth:`sample_previous_step`.

        Raises:
            ValueError: as :meth:`sample_previous_step`; also a scalar ``timestep`` that is not the
                current step's (``scheduler.timesteps[step_index]``), or a step past the schedule's end.

        Returns:
            :class:`FlowMatchSDEDiscreteSchedulerOutput`, or with ``return_dict=False`` the tuple
            ``(prev_sample, log_prob, prev_sample_mean, std_dev_t)``.
        """
        _reject_integer_timestep(timestep)
        per_sample = isinstance(timestep, torch.Tensor) and timestep.ndim > 0
        if not per_sample:
            self._start_sequential_step(timestep)

        prev_sample, log_prob, prev_sample_mean, std_dev_t = self.sample_previous_step(
            sample=sample,
            model_output=model_output,
            timestep=timestep if per_sample else None,
            generator=generator,
            per_token_timesteps=per_token_timesteps,
            noise_level=noise_level,
            prev_sample=prev_sample,
            sde_type=sde_type,
            return_logprobs=return_logprobs,
            include_logprob_normalizer=include_logprob_normalizer,
        )
        if not per_sample:
            self._step_index += 1

        if not return_dict:
            return (prev_sample, log_prob, prev_sample_mean, std_dev_t)
        return FlowMatchSDEDiscreteSchedulerOutput(
            prev_sample=prev_sample, log_prob=log_prob, prev_sample_mean=prev_sample_mean, std_dev_t=std_dev_t
        )

    def sample_previous_step(
        self,
        sample: torch.Tensor,
        model_output: torch.Tensor,
        timestep: torch.FloatTensor | float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        noise_level: float = 0.7,
        prev_sample: torch.Tensor | None = None,
        sde_type: SDEType = "sde",
        return_logprobs: bool = True,
        return_sqrt_dt: bool = False,
        include_logprob_normalizer: bool = True,
    ) -> tuple:
        """Run a single SDE / CPS reverse step; does not touch the internal step index.

        Args:
            sample: ``(B, ...)`` float32 current sample x_t.
            model_output: float32 model output (velocity), same shape as ``sample``.
            timestep: ``None`` to use the internal step index (sequential loop); a ``(B,)`` tensor
                of values from ``scheduler.timesteps``, looked up per sample; a scalar applies to
                the whole batch.
            generator: a random generator for the noise, or a list of one per sample.
            per_token_timesteps: not supported (raises ``NotImplementedError``).
            noise_level: eta, a finite number >= 0 (<= 1 for ``"cps"``); 0 gives the deterministic Euler step.
            prev_sample: float32 sample of the previous timestep. When given it is not sampled but
                scored: this is how a trainer recomputes the log-prob of a rollout's transition.
            sde_type: ``"sde"`` (Flow-GRPO), ``"cps"`` or ``"dance_sde"``.
            return_logprobs: compute the log-prob (else ``log_prob`` is ``None``).
            return_sqrt_dt: also return ``sqrt(-dt)`` of shape ``(B,)`` (GRPO-Guard's ratio normalisation).
            include_logprob_normalizer: include ``-log std - log sqrt(2 pi)`` in the log-prob
                (``"sde"`` and ``"dance_sde"``; ``"cps"`` never has one).

        Returns:
            ``(prev_sample, log_prob, prev_sample_mean, std_dev_t)``, plus ``sqrt_dt`` last when
            ``return_sqrt_dt``. ``log_prob`` is ``(B,)`` (mean over non-batch dimensions) or
            ``None``; ``std_dev_t`` is ``(B, 1, ..., 1)``.

        Raises:
            ValueError: ``set_timesteps`` not called yet; a timestep not in ``scheduler.timesteps``;
                no step index (``timestep=None`` before any ``step``) or one past the schedule's end;
                a NaN, infinite or negative ``noise_level`` (or one above 1 for ``"cps"``); a
                generator list whose length is not the batch; mismatched shapes.
            TypeError: a non-float32 or non-tensor sample, a non-number ``noise_level``, a
                generator that is not a ``torch.Generator``.
        """
        if per_token_timesteps is not None:
            raise NotImplementedError("per_token_timesteps is not supported by FlowMatchSDEDiscreteScheduler.")
        if sde_type not in SDE_TYPES:
            raise ValueError(f"Unknown sde_type {sde_type!r}; expected one of {SDE_TYPES}.")
        noise_level = check_noise_level("`noise_level`", noise_level, sde_type)
        _check_fp32(sample=sample, model_output=model_output, prev_sample=prev_sample)
        _check_same_shape(sample, model_output=model_output, prev_sample=prev_sample)
        generator = check_generator(generator, sample.shape[0])

        sigma, sigma_next = self._sigmas_for(timestep, sample)
        transition = self._transition(sde_type, sample, model_output, sigma, sigma_next, noise_level)

        if prev_sample is None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = transition.mean + transition.noise_std * noise

        log_prob = None
        if return_logprobs:
            # Gradients reach the log-prob through the mean only, never through the sample itself.
            target = prev_sample.detach()
            if sde_type == "cps":
                elementwise = cps_log_prob(target, transition.mean)
            else:
                elementwise = gaussian_log_prob(
                    target, transition.mean, transition.noise_std, include_logprob_normalizer
                )
            log_prob = elementwise.mean(dim=tuple(range(1, elementwise.ndim)))

        outputs = (prev_sample, log_prob, transition.mean, transition.std_dev_t)
        if return_sqrt_dt:
            return outputs + (torch.sqrt(sigma - sigma_next).reshape(-1),)
        return outputs

    def _transition(
        self,
        sde_type: str,
        sample: torch.Tensor,
        model_output: torch.Tensor,
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
        noise_level: float,
    ) -> Transition:
        if sde_type == "sde":
            sigma_max = self.sigmas[1].to(sample.device)
            return sde_transition(sample, model_output, sigma, sigma_next, noise_level, sigma_max)
        if sde_type == "cps":
            return cps_transition(sample, model_output, sigma, sigma_next, noise_level)
        return dance_sde_transition(sample, model_output, sigma, sigma_next, noise_level)

    def _check_timesteps_set(self) -> None:
        # Before set_timesteps the Euler scheduler holds its 1000-step training schedule, without
        # the final sigma = 0: steps on it would be silently wrong, and the last one an IndexError.
        if getattr(self, "num_inference_steps", None) is None:
            raise ValueError("the scheduler has no inference schedule yet: call `set_timesteps` first")

    def _checked_step_index(self) -> int:
        """The internal step index, if there is one and the schedule has a step left at it."""
        if self.step_index is None:
            raise ValueError("No step index yet: pass `timestep`, or call `step` (which initialises it) first.")
        if self.step_index >= len(self.timesteps):
            raise ValueError(
                f"all {len(self.timesteps)} steps of the schedule are taken (step_index={self.step_index}); "
                "call `set_timesteps` to start a new one"
            )
        return self.step_index

    def _start_sequential_step(self, timestep: float | torch.Tensor) -> None:
        """Initialise the step index on the first scalar ``step`` (as diffusers), then check ``timestep`` is its."""
        self._check_timesteps_set()
        if self.step_index is None:
            if self.begin_index is None:
                self._step_indices(timestep, 1)  # a clear error where diffusers' look-up raises IndexError
            self._init_step_index(timestep)
        index = self._checked_step_index()
        expected = self.timesteps[index].to(torch.float32)
        given = torch.as_tensor(timestep).to(device=expected.device, dtype=torch.float32)
        if given.numel() != 1 or bool(given.reshape(()) != expected):
            raise ValueError(
                f"`timestep` {given.tolist()} is not the current step's: scheduler.timesteps[{index}] = "
                f"{expected.item()}; pass the timesteps in order, or a (batch,) tensor for per-sample steps"
            )

    def _sigmas_for(self, timestep: object, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigma, sigma')`` per sample, shaped ``(B, 1, ..., 1)`` to broadcast against ``sample``."""
        if self.config.invert_sigmas:
            raise NotImplementedError("invert_sigmas=True (increasing sigmas) has no reverse SDE step here.")
        self._check_timesteps_set()
        batch_size = sample.shape[0]
        if timestep is None:
            index = torch.full((batch_size,), self._checked_step_index(), dtype=torch.long, device=self.sigmas.device)
        else:
            index = self._step_indices(timestep, batch_size)
        shape = (batch_size,) + (1,) * (sample.ndim - 1)
        sigma = self.sigmas[index].to(sample.device).view(shape)
        sigma_next = self.sigmas[index + 1].to(sample.device).view(shape)
        return sigma, sigma_next

    def _step_indices(self, timestep: object, batch_size: int) -> torch.Tensor:
        """Index in ``self.timesteps`` of each sample's timestep (a scalar applies to every sample)."""
        _reject_integer_timestep(timestep)
        schedule = self.timesteps.to(torch.float32)
        values = torch.as_tensor(timestep).to(device=schedule.device, dtype=torch.float32).reshape(-1)
        if values.numel() == 1:
            values = values.expand(batch_size)
        elif values.numel() != batch_size:
            raise ValueError(
                f"`timestep` must be a scalar or have one entry per sample ({batch_size}), got {values.numel()}."
            )
        matches = values[:, None] == schedule[None, :]
        counts = matches.sum(dim=1)
        if bool((counts == 0).any()):
            missing = values[counts == 0].tolist()
            raise ValueError(f"`timestep` values {missing} are not in scheduler.timesteps; call set_timesteps first.")
        # Same rule as diffusers' index_for_timestep: a repeated timestep resolves to its second occurrence.
        occurrence = torch.where(counts > 1, 2, 1)
        return (matches & (matches.cumsum(dim=1) == occurrence[:, None])).int().argmax(dim=1).to(self.sigmas.device)
