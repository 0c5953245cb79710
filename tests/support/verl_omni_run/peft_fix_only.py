"""``external_lib`` for a run of verl-omni's own Qwen-Image pipeline: only the LoRA weight-sync workaround.

With peft 0.21 verl-omni main cannot sync LoRA weights to its rollout for any diffusers model
(:mod:`qwen_image_omni.integrations.verl_omni_lora_sync`); this installs that workaround and registers
nothing else, so the run keeps verl-omni's own adapters, rollout pipeline and diffusers' transformer.
"""

from qwen_image_omni.integrations import verl_omni_lora_sync

verl_omni_lora_sync.install()
