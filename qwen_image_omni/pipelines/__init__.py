"""RL pipelines interface (verl-omni's ``verl_omni.pipelines``) without ``txt_seq_lens``.

A pipeline plugs one diffusion architecture into an RL training loop:

- a training-side adapter, a ``DiffusionModelBase`` subclass of classmethods registered for
  ``(architecture, algorithm)``: scheduler set-up, transformer inputs, forward + reverse step;
- optionally its rollout pipelines, registered on ``VllmOmniPipelineBase`` by dotted path: one on
  diffusers (runs anywhere) and one on vllm-omni, which answers where vllm-omni is installed and is
  imported only when an engine asks for it (``custom_pipeline_name``).

``DiffusionModelConfig.architecture`` (``_class_name`` of ``model_index.json``) and
``DiffusionModelConfig.algorithm`` select them; the helpers in ``utils`` dispatch to the adapter.
No argument, input dict or return value carries a text sequence length: the transformer takes it
from ``encoder_hidden_states.shape[1]``.

Importing this package registers the built-in adapters and rollout pipelines; it imports no
vllm-omni module.
"""

from .config import (
    SDE_TYPES,
    DiffusionAlgoConfig,
    DiffusionModelConfig,
    DiffusionPipelineConfig,
    read_architecture,
)
from .model_base import (
    DiffusionI2IModelBase,
    DiffusionModelBase,
    VllmOmniPipelineBase,
    dotted_path,
    import_dotted_path,
    import_external_libs,
)
from .utils import (
    build_scheduler,
    default_device,
    forward,
    forward_and_sample_previous_step,
    prepare_model_inputs,
    set_timesteps,
)

# --- Built-in adapters: importing a module registers its classes. ------------------------------
# Keep them below the names above, which they import.
from . import qwen_image_flow_grpo  # QwenImagePipeline / flow_grpo
from . import qwen_image_diffusion_nft  # QwenImagePipeline / diffusion_nft
from . import qwen_image_edit_flow_grpo  # QwenImageEditPlusPipeline / flow_grpo
from . import qwen_image_mix_grpo  # QwenImagePipeline / mix_grpo
from . import qwen_image_dpo  # QwenImagePipeline / dpo
from . import qwen_image_dual_grpo  # QwenImagePipeline / dual_grpo
from . import sd3_dpo  # StableDiffusion3Pipeline / dpo

# --- End of built-in adapters. -----------------------------------------------------------------

__all__ = [
    "SDE_TYPES",
    "DiffusionAlgoConfig",
    "DiffusionI2IModelBase",
    "DiffusionModelBase",
    "DiffusionModelConfig",
    "DiffusionPipelineConfig",
    "VllmOmniPipelineBase",
    "build_scheduler",
    "default_device",
    "dotted_path",
    "forward",
    "forward_and_sample_previous_step",
    "import_dotted_path",
    "import_external_libs",
    "prepare_model_inputs",
    "read_architecture",
    "set_timesteps",
]
