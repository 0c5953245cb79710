"""Integrations with serving and training stacks, each imported only when its stack is installed.

- ``qwen_image_omni.integrations.vllm_omni``: the vllm-omni plugin (entry point
  ``vllm_omni.general_plugins``) and the vllm-omni pipelines that run our transformer, one module
  per job (see its docstring);
- ``qwen_image_omni.integrations.verl_omni``: the verl-omni bridge (``external_lib``), which puts
  our training adapters and rollout pipelines into verl-omni's registries.
"""
