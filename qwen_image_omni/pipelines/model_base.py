"""Registries of the RL pipeline adapters, keyed by ``(architecture, algorithm)``.

``DiffusionModelBase`` is the training-side adapter interface: a class of classmethods (never
instantiated) that builds the scheduler, prepares the transformer's inputs and runs one forward plus
reverse-sampling step. ``VllmOmniPipelineBase`` maps the same key to the rollout-side pipeline: the
vllm-omni one where vllm-omni is installed, the diffusers one elsewhere, each named by its dotted
path and imported only when a class is asked for. ``architecture`` is the ``_class_name`` of the
model's ``model_index.json``; ``algorithm`` is ``DiffusionModelConfig.algorithm``.

Unlike verl-omni's interface, nothing here takes or returns a text sequence length: the
transformer reads it from ``encoder_hidden_states.shape[1]``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

if TYPE_CHECKING:
    from diffusers import ModelMixin, SchedulerMixin

    from .config import DiffusionModelConfig

T = TypeVar("T", bound=type)

Key = tuple[str, str]


def dotted_path(cls: type) -> str:
    """Return ``"module.QualName"``, the import path of ``cls``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def import_dotted_path(path: str) -> Any:
    """The object a ``"package.module.Name"`` path names: the module imported, then its attribute.

    The resolution vllm-omni applies to ``custom_pipeline_name``.

    Raises:
        ImportError: the module cannot be imported, or has no such attribute; the message names the path.
    """
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted path 'module.Name'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ImportError(f"{path!r}: module {module_name!r} has no attribute {name!r}") from None


def vllm_omni_installed() -> bool:
    """Whether vllm-omni is installed here (found on the path; not imported)."""
    return importlib.util.find_spec("vllm_omni") is not None


def import_external_libs(external_lib: str | list[str] | tuple[str, ...] | None) -> None:
    """Import the module(s) named by ``external_lib`` (verl-omni's ``DiffusionModelConfig.external_lib``).

    Importing an adapter library registers its adapters. ``None`` or ``""`` imports nothing; a
    comma-separated string or a list names several modules.

    Raises:
        TypeError: ``external_lib`` is neither a str nor a list of str.
        ImportError: a module cannot be imported; the message names it and the config field.
    """
    if external_lib is None or external_lib == "":
        return
    if isinstance(external_lib, str):
        names = [name.strip() for name in external_lib.split(",") if name.strip()]
    elif isinstance(external_lib, (list, tuple)) and all(isinstance(name, str) for name in external_lib):
        names = list(external_lib)
    else:
        raise TypeError(f"external_lib must be a module name or a list of them, got {external_lib!r}")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ImportError(f"external_lib={name!r} cannot be imported: {error}") from error


def _check_key(architecture: Any, algorithm: Any) -> Key:
    """Validate a registry key; both parts must be non-empty strings."""
    for name, value in (("architecture", architecture), ("algorithm", algorithm)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty str, got {type(value).__name__} {value!r}")
    return architecture, algorithm


def _path_of(entry: type | str) -> str:
    """The dotted path of a registry entry: a class, or already a path."""
    return entry if isinstance(entry, str) else dotted_path(entry)


def _add(registry: dict[Key, Any], key: Key, entry: type | str, what: str, replace: bool = False) -> None:
    """Register ``entry`` (a class, or the dotted path of one) under ``key``.

    Registering the same entry again is a no-op, and so is re-registering a class with the same
    module and qualified name (a module reload makes a new class object; the new one replaces the
    old). Any other entry already under ``key`` raises ``ValueError`` unless ``replace`` is set.
    """
    existing = registry.get(key)
    if replace or existing is None:
        pass
    elif existing is not entry and _path_of(existing) != _path_of(entry):
        raise ValueError(
            f"{what} {key} is already registered to {_path_of(existing)}; cannot register {_path_of(entry)}"
        )
    registry[key] = entry


class DiffusionModelBase(ABC):
    """Abstract base of the training-side diffusion model adapters.

    Different diffusion models have very different forward / sampling logic. Subclass this ABC,
    implement the four abstract classmethods and register the subclass for the
    ``(architecture, algorithm)`` pair it serves::

        @DiffusionModelBase.register("QwenImagePipeline", algorithm="flow_grpo")
        class QwenImage(DiffusionModelBase):
            ...

    Adapters are classes of classmethods and are never instantiated, so ``register`` checks that
    no abstract method is left unimplemented. A method that makes no sense for an algorithm (e.g.
    reverse sampling for DPO) is implemented to raise ``NotImplementedError``.
    """

    _registry: ClassVar[dict[Key, type[DiffusionModelBase]]] = {}

    @classmethod
    def register(cls, architecture: str, algorithm: str) -> Callable[[T], T]:
        """Class decorator that registers a subclass for ``(architecture, algorithm)``.

        Raises:
            TypeError: an empty or non-str key; the decorated object is not a
                ``DiffusionModelBase`` subclass, or leaves abstract methods unimplemented.
            ValueError: a different class is already registered under the key.
        """
        key = _check_key(architecture, algorithm)

        def decorator(subclass: T) -> T:
            if not (isinstance(subclass, type) and issubclass(subclass, DiffusionModelBase)):
                raise TypeError(
                    f"@DiffusionModelBase.register{key} expects a DiffusionModelBase subclass, got {subclass!r}"
                )
            if inspect.isabstract(subclass):
                missing = sorted(subclass.__abstractmethods__)
                raise TypeError(f"{dotted_path(subclass)} does not implement {missing}; cannot register it for {key}")
            _add(DiffusionModelBase._registry, key, subclass, "diffusion model adapter")
            return subclass

        return decorator

    @classmethod
    def registered(cls) -> list[Key]:
        """Return the registered ``(architecture, algorithm)`` keys, sorted."""
        return sorted(DiffusionModelBase._registry)

    @classmethod
    def get_class(cls, model_config: DiffusionModelConfig) -> type[DiffusionModelBase]:
        """Return the subclass registered for ``(model_config.architecture, model_config.algorithm)``.

        Imports ``model_config.external_lib`` first when the config has one (verl-omni's field).

        Raises:
            NotImplementedError: nothing is registered for that pair; the message lists what is.
        """
        return cls.get_class_by_name(
            model_config.architecture, model_config.algorithm, getattr(model_config, "external_lib", None)
        )

    @classmethod
    def peek_class(cls, architecture: str, algorithm: str) -> type[DiffusionModelBase] | None:
        """Return the subclass registered for ``(architecture, algorithm)``, or ``None`` (never raises)."""
        return DiffusionModelBase._registry.get((architecture, algorithm))

    @classmethod
    def get_class_by_name(
        cls, architecture: str, algorithm: str, external_lib: str | list[str] | None = None
    ) -> type[DiffusionModelBase]:
        """Return the subclass registered for ``(architecture, algorithm)``, before any config exists.

        Args:
            architecture: ``_class_name`` of the model's ``model_index.json``.
            algorithm: the training algorithm.
            external_lib: module(s) to import first, so that they register their adapters.

        Raises:
            NotImplementedError: nothing is registered for that pair; the message lists what is.
            ImportError: ``external_lib`` cannot be imported.
        """
        import_external_libs(external_lib)
        key = (architecture, algorithm)
        try:
            return DiffusionModelBase._registry[key]
        except KeyError:
            raise NotImplementedError(
                f"no diffusion model adapter registered for (architecture={key[0]!r}, algorithm={key[1]!r}); "
                f"registered: {cls.registered()}. Import the module that defines it "
                "(importing qwen_image_omni.pipelines registers the built-in adapters), "
                "or name it in DiffusionModelConfig.external_lib."
            ) from None

    # -- optional hooks (verl-omni main's), each a no-op by default --------------------------------

    @classmethod
    def build_module(cls, model_config: DiffusionModelConfig, torch_dtype: torch.dtype) -> torch.nn.Module | None:
        """Build the trainer's diffusion module; ``None`` lets the trainer use diffusers' ``AutoModel``."""
        return None

    @classmethod
    def configure_train_mode(cls, module: torch.nn.Module) -> None:
        """Called after ``module.train()`` for architecture-specific overrides."""
        return None

    @classmethod
    def validate_lora_config(cls, model_config: DiffusionModelConfig) -> None:
        """Check the LoRA settings of ``model_config``; raise ``ValueError`` for ones the model cannot take."""
        return None

    @classmethod
    def prepare_processor_files(cls, model_path: str) -> str | None:
        """Fix up the checkpoint's processor files before they are loaded; return another path, or ``None``."""
        return None

    @classmethod
    def configure_trainable_params(cls, module: torch.nn.Module, model_config: DiffusionModelConfig) -> None:
        """Set ``requires_grad`` on the parameters to train, after the module is built (before FSDP)."""
        return None

    @classmethod
    def forward(
        cls,
        module: ModelMixin,
        model_config: DiffusionModelConfig,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """One model prediction: ``module(**model_inputs)[0]``.

        Forward-process objectives (DPO, DiffusionNFT) train on it directly; adapters override it for
        guidance, negative inputs or output conversion.
        """
        return module(**model_inputs)[0]

    @classmethod
    @abstractmethod
    def build_scheduler(cls, model_config: DiffusionModelConfig) -> SchedulerMixin:
        """Build the diffusion scheduler for this model, timesteps and sigmas already set.

        Args:
            model_config: the configuration of the diffusion model.
        """

    @classmethod
    @abstractmethod
    def set_timesteps(cls, scheduler: SchedulerMixin, model_config: DiffusionModelConfig, device: str | torch.device):
        """Set timesteps and sigmas on the scheduler and move them to ``device``.

        Args:
            scheduler: the scheduler used for the diffusion process.
            model_config: the configuration of the diffusion model.
            device: the device to move the timesteps and sigmas to.
        """

    @classmethod
    @abstractmethod
    def prepare_model_inputs(
        cls,
        module: ModelMixin,
        model_config: DiffusionModelConfig,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_embeds_mask: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds_mask: torch.Tensor | None,
        micro_batch: Mapping[str, Any],
        step: int,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Build the architecture-specific keyword arguments of one transformer forward.

        For reverse-trajectory algorithms ``latents`` and ``timesteps`` hold the whole rollout
        trajectory and ``step`` selects the slice; forward-process objectives (DPO) pass an already
        noised latent and its timestep. The caller does the universal pre-processing (common tensor
        extraction, nested-embed unpadding) first. Prompt embeddings may be wider than their valid
        tokens.

        Args:
            module: the diffusion transformer.
            model_config: the configuration of the diffusion model.
            latents: ``(B, T, ...)`` trajectory or ``(B, ...)`` selected/noised latent.
            timesteps: ``(B, T)`` trajectory or ``(B,)`` selected timestep.
            prompt_embeds: ``(B, L, D)`` dense positive prompt embeddings.
            prompt_embeds_mask: ``(B, L)`` attention mask of ``prompt_embeds``, or ``None``.
            negative_prompt_embeds: ``(B, L', D)`` negative prompt embeddings, or ``None``.
            negative_prompt_embeds_mask: ``(B, L')`` mask of ``negative_prompt_embeds``, or ``None``.
            micro_batch: the whole micro-batch (a ``TensorDict`` or a dict) for architecture-specific
                metadata (height, width, vae_scale_factor, pooled embeddings, ...).
            step: the current denoising step index.

        Returns:
            ``(model_inputs, negative_model_inputs)``; the second is ``None`` without guidance.
        """

    @classmethod
    @abstractmethod
    def forward_and_sample_previous_step(
        cls,
        module: ModelMixin,
        scheduler: SchedulerMixin,
        model_config: DiffusionModelConfig,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None,
        scheduler_inputs: Mapping[str, torch.Tensor] | None,
        step: int,
    ) -> tuple:
        """Forward the model and recompute the reverse step (FlowGRPO, DanceGRPO, ...).

        Args:
            module: the diffusion transformer.
            scheduler: the scheduler used for the diffusion process.
            model_config: the configuration of the diffusion model.
            model_inputs: the transformer inputs from :meth:`prepare_model_inputs`.
            negative_model_inputs: the negative inputs for guidance, or ``None``.
            scheduler_inputs: extra scheduler inputs (a ``TensorDict`` or a dict), e.g. the
                trajectory's ``all_latents`` and ``all_timesteps``.
            step: the current step of the diffusion process.

        Returns:
            ``(log_prob, prev_sample_mean, std_dev_t, sqrt_dt)``.
        """


TARGET_SEQ_LEN_KEY = "_target_seq_len"
"""Key of the model inputs that tells :meth:`DiffusionI2IModelBase.forward` how many target tokens to keep
(verl-omni's name, so inputs prepared by either side read the same)."""


class DiffusionI2IModelBase(DiffusionModelBase):
    """Base of the image-conditioned (image-to-image) training adapters.

    Adds two hooks that :func:`~qwen_image_omni.pipelines.utils.prepare_model_inputs` calls after the
    text-to-image :meth:`prepare_model_inputs`:

    1. :meth:`prepare_condition` reads the condition tensors from the micro-batch;
    2. :meth:`inject_condition` merges them into the model inputs. The default concatenates
       ``condition["image_latents"]`` ``(B, S_c, C)`` after ``hidden_states`` along the tokens and
       records the target length, so :meth:`forward` slices the prediction back to the target tokens.

    An I2I adapter must find a condition: the dispatcher raises ``ValueError`` when
    :meth:`prepare_condition` returns ``None``. Store condition latents under a micro-batch key
    other than ``image_latents`` (verl-omni's FLOPs counter reads that one as the denoised latent);
    ``condition_image_latents`` is the convention.
    """

    @classmethod
    def prepare_condition(cls, micro_batch: Mapping[str, Any], latents: torch.Tensor, step: int) -> dict | None:
        """Return the condition tensors of ``micro_batch`` (``{"image_latents": ...}``), or ``None``."""
        return None

    @classmethod
    def inject_condition(
        cls,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None,
        condition: Mapping[str, Any] | None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Concatenate ``condition["image_latents"]`` after ``hidden_states`` in both inputs.

        An empty or ``None`` condition changes nothing.

        Raises:
            ValueError: no ``image_latents`` in the condition; ``image_latents`` already among the
                model inputs; condition latents that are not ``(B, S_c, C)`` with the batch and
                channels of ``hidden_states``.
        """
        if not condition:
            return model_inputs, negative_model_inputs
        image_latents = condition.get("image_latents")
        if image_latents is None:
            raise ValueError(f"inject_condition needs condition['image_latents'], got keys {sorted(condition)}")
        if "image_latents" in model_inputs:
            raise ValueError(
                "model_inputs already hold 'image_latents'; condition latents must come in the condition "
                "(micro-batch key 'condition_image_latents'), not among the model inputs"
            )
        hidden_states = model_inputs["hidden_states"]
        if not isinstance(image_latents, torch.Tensor) or image_latents.ndim != 3:
            shape = tuple(image_latents.shape) if isinstance(image_latents, torch.Tensor) else type(image_latents)
            raise ValueError(f"condition['image_latents'] must be a (batch, tokens, channels) tensor, got {shape}")
        if image_latents.shape[0] != hidden_states.shape[0] or image_latents.shape[2] != hidden_states.shape[2]:
            raise ValueError(
                f"condition['image_latents'] {tuple(image_latents.shape)} must have the batch and channels of "
                f"hidden_states {tuple(hidden_states.shape)}"
            )
        target_seq_len = hidden_states.shape[1]
        for inputs in (model_inputs, negative_model_inputs):
            if inputs is None:
                continue
            states = inputs["hidden_states"]
            inputs["hidden_states"] = torch.cat([states, image_latents.to(states.device, states.dtype)], dim=1)
            inputs[TARGET_SEQ_LEN_KEY] = target_seq_len
        return model_inputs, negative_model_inputs

    @classmethod
    def forward(
        cls,
        module: ModelMixin,
        model_config: DiffusionModelConfig,
        model_inputs: dict[str, Any],
        negative_model_inputs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The prediction for the target tokens only (the condition tokens' part is dropped).

        Raises:
            ValueError: positive and negative inputs disagree on the target length, or the model
                returned fewer tokens than the target.
        """
        model_inputs = dict(model_inputs)
        target_seq_len = model_inputs.pop(TARGET_SEQ_LEN_KEY, None)
        if negative_model_inputs is not None:
            negative_model_inputs = dict(negative_model_inputs)
            negative_target = negative_model_inputs.pop(TARGET_SEQ_LEN_KEY, None)
            if target_seq_len is None:
                target_seq_len = negative_target
            elif negative_target is not None and negative_target != target_seq_len:
                raise ValueError(
                    f"positive and negative inputs keep different target lengths: {target_seq_len} and {negative_target}"
                )
        prediction = super().forward(module, model_config, model_inputs, negative_model_inputs)
        if target_seq_len is None:
            return prediction
        if prediction.shape[1] < target_seq_len:
            raise ValueError(
                f"the model returned {prediction.shape[1]} tokens, fewer than the {target_seq_len} target tokens"
            )
        return prediction[:, :target_seq_len]


class VllmOmniPipelineBase:
    """Registry of the rollout-side pipelines, keyed by ``(architecture, algorithm)``.

    A key holds up to two pipelines, each a class or the dotted path ``"module.Name"`` of one:

    - one that runs anywhere (the diffusers rollout pipelines; a third party's class), registered
      with the :meth:`register` decorator or :meth:`register_paths` ``(diffusers=...)``;
    - one that needs vllm-omni, registered by path only (:meth:`register_paths` ``(vllm_omni=...)``):
      it answers for the key wherever vllm-omni is installed.

    :meth:`get_pipeline_path` answers without importing anything; :meth:`get_class` imports the
    pipeline's module then. So registering the built-in pipelines (importing
    ``qwen_image_omni.pipelines``) imports no vllm-omni module, and an engine imports a vllm-omni
    rollout pipeline only when it asks for it (``load_format="custom_pipeline"``,
    ``custom_pipeline_name=VllmOmniPipelineBase.get_pipeline_path(...)``)::

        package = "qwen_image_omni.pipelines.qwen_image_flow_grpo"
        VllmOmniPipelineBase.register_paths(
            "QwenImagePipeline", "flow_grpo",
            diffusers=f"{package}.diffusers_rollout_pipeline.QwenImagePipelineWithLogProb",
            vllm_omni=f"{package}.vllm_omni_rollout_pipeline.QwenImagePipelineWithLogProb",
        )
    """

    _registry: ClassVar[dict[Key, type | str]] = {}
    """Per key, the pipeline that runs anywhere: a class, or its dotted path."""
    _vllm_omni_registry: ClassVar[dict[Key, str]] = {}
    """Per key, the dotted path of the pipeline that needs vllm-omni."""

    @classmethod
    def register(cls, architecture: str, algorithm: str, *, replace: bool = False) -> Callable[[T], T]:
        """Class decorator that registers a pipeline class for ``(architecture, algorithm)``.

        The class answers for the key unless a vllm-omni pipeline is registered for it and vllm-omni
        is installed.

        Args:
            architecture: ``_class_name`` of the model's ``model_index.json``.
            algorithm: ``DiffusionModelConfig.algorithm``.
            replace: replace a different pipeline already registered under the key.

        Raises:
            TypeError: an empty or non-str key, or the decorated object is not a class.
            ValueError: a different pipeline is already registered under the key and ``replace`` is False.
        """
        key = _check_key(architecture, algorithm)

        def decorator(pipeline_cls: T) -> T:
            if not isinstance(pipeline_cls, type):
                raise TypeError(f"@VllmOmniPipelineBase.register{key} expects a class, got {pipeline_cls!r}")
            _add(VllmOmniPipelineBase._registry, key, pipeline_cls, "vllm-omni pipeline", replace=replace)
            return pipeline_cls

        return decorator

    @classmethod
    def register_paths(
        cls,
        architecture: str,
        algorithm: str,
        *,
        diffusers: str | None = None,
        vllm_omni: str | None = None,
        replace: bool = False,
    ) -> None:
        """Register the rollout pipelines of ``(architecture, algorithm)`` by dotted path, importing neither.

        Args:
            architecture: ``_class_name`` of the model's ``model_index.json``.
            algorithm: ``DiffusionModelConfig.algorithm``.
            diffusers: ``"module.Name"`` of the pipeline that runs anywhere, or None.
            vllm_omni: ``"module.Name"`` of the pipeline that needs vllm-omni, or None; it answers for
                the key wherever vllm-omni is installed.
            replace: replace different pipelines already registered under the key.

        Raises:
            TypeError: an empty or non-str key, or a path that is not a dotted ``"module.Name"`` str.
            ValueError: a different pipeline is already registered under the key and ``replace`` is False.
        """
        key = _check_key(architecture, algorithm)
        for name, path in (("diffusers", diffusers), ("vllm_omni", vllm_omni)):
            if path is not None and not (isinstance(path, str) and "." in path.strip(".")):
                raise TypeError(f"{name} must be a dotted path 'module.Name', got {path!r}")
        if diffusers is not None:
            _add(VllmOmniPipelineBase._registry, key, diffusers, "rollout pipeline", replace=replace)
        if vllm_omni is not None:
            _add(VllmOmniPipelineBase._vllm_omni_registry, key, vllm_omni, "vllm-omni pipeline", replace=replace)

    @classmethod
    def registered(cls) -> list[Key]:
        """Return the registered ``(architecture, algorithm)`` keys, sorted."""
        return sorted({*VllmOmniPipelineBase._registry, *VllmOmniPipelineBase._vllm_omni_registry})

    @classmethod
    def _entry(cls, architecture: str, algorithm: str) -> type | str | None:
        """What answers for the key here: its vllm-omni pipeline where vllm-omni is installed, else the other."""
        key = (architecture, algorithm)
        vllm_omni = VllmOmniPipelineBase._vllm_omni_registry.get(key)
        if vllm_omni is not None and vllm_omni_installed():
            return vllm_omni
        return VllmOmniPipelineBase._registry.get(key)

    @classmethod
    def get_class(cls, architecture: str, algorithm: str) -> type | None:
        """Return the pipeline class for ``(architecture, algorithm)`` (imported if registered by path), or ``None``.

        Raises:
            ImportError: the registered path does not import (for a vllm-omni pipeline: a vllm-omni
                our pipelines do not fit); the message names the key and the path.
        """
        entry = cls._entry(architecture, algorithm)
        if not isinstance(entry, str):
            return entry
        try:
            return import_dotted_path(entry)
        except ImportError as error:
            raise ImportError(
                f"the rollout pipeline of ({architecture!r}, {algorithm!r}), {entry}, cannot be imported: {error}"
            ) from error

    @classmethod
    def get_pipeline_path(cls, architecture: str, algorithm: str) -> str | None:
        """Return the dotted import path ``"module.Class"`` for ``(architecture, algorithm)``, or ``None``.

        Imports nothing: a pipeline registered by path answers with that path.
        """
        entry = cls._entry(architecture, algorithm)
        return None if entry is None else _path_of(entry)
