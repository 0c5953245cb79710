"""What ``build_module`` hands an RL trainer: the attention backend it names, a config that saves itself.

verl-omni's FSDP engine sets both up for diffusers' class built through ``AutoModel``; a module an
adapter builds skips that set-up (``qwen_image_omni/pipelines/training_module.py``).
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from diffusers import QwenImageTransformer2DModel as DiffusersTransformer
from diffusers.models.attention_dispatch import AttentionBackendName

from qwen_image_omni import QwenImageTransformer2DModel
from qwen_image_omni.pipelines import DiffusionModelBase
from qwen_image_omni.pipelines.qwen_image_flow_grpo import QwenImage
from qwen_image_omni.pipelines.training_module import FA3_HUB_BACKEND, FALLBACK_BACKEND


def _backends(module: torch.nn.Module) -> set:
    return {block.attn.processor._attention_backend for block in module.transformer_blocks}


def _build(checkpoint, **config) -> QwenImageTransformer2DModel:
    return QwenImage.build_module(SimpleNamespace(local_path=str(checkpoint), **config), torch.float32)


QWEN_IMAGE_KEYS = [key for key in DiffusionModelBase.registered() if key[0].startswith("QwenImage")]


@pytest.mark.parametrize("key", QWEN_IMAGE_KEYS, ids=["/".join(key) for key in QWEN_IMAGE_KEYS])
def test_every_qwen_image_adapter_builds_our_transformer_for_the_trainer(checkpoint, key):
    config = SimpleNamespace(local_path=str(checkpoint), attn_backend="_native_math")
    module = DiffusionModelBase.peek_class(*key).build_module(config, torch.float32)
    assert type(module) is QwenImageTransformer2DModel
    assert _backends(module) == {AttentionBackendName._NATIVE_MATH}
    assert callable(module.config.save_pretrained)


def test_config_saves_itself_as_a_diffusers_config_under_the_model_class_name(checkpoint, tmp_path):
    module = _build(checkpoint)
    # What FSDP2's fully_shard does to the module's class before verl's checkpoint manager saves.
    module.__class__ = type(f"FSDP{type(module).__name__}", (type(module),), {})
    module.config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "QwenImageTransformer2DModel"
    loaded = DiffusersTransformer.from_config(DiffusersTransformer.load_config(tmp_path))
    assert {key: loaded.config[key] for key in ("num_layers", "joint_attention_dim", "axes_dims_rope")} == {
        key: module.config[key] for key in ("num_layers", "joint_attention_dim", "axes_dims_rope")
    }


def test_the_named_attention_backend_is_the_one_every_block_attends_with(checkpoint):
    module = _build(checkpoint, attn_backend="_native_math")
    assert _backends(module) == {AttentionBackendName._NATIVE_MATH}


def test_no_backend_named_keeps_diffusers_default(checkpoint):
    assert _backends(_build(checkpoint)) == {None}


def test_fa3_from_the_hub_falls_back_to_native_where_it_cannot_load(checkpoint, monkeypatch, caplog):
    set_backend = QwenImageTransformer2DModel.set_attention_backend

    def fa3_unavailable(self, backend):
        if backend == FA3_HUB_BACKEND:
            raise RuntimeError("no FlashAttention 3 kernel here")
        return set_backend(self, backend)

    monkeypatch.setattr(QwenImageTransformer2DModel, "set_attention_backend", fa3_unavailable)
    config = SimpleNamespace(local_path=str(checkpoint), attn_backend=FA3_HUB_BACKEND)
    with caplog.at_level(logging.WARNING):
        module = QwenImage.build_module(config, torch.float32)
    assert _backends(module) == {AttentionBackendName.NATIVE}
    assert config.attn_backend == FALLBACK_BACKEND
    assert FA3_HUB_BACKEND in caplog.text


def test_another_backend_that_cannot_be_set_is_a_value_error_naming_it(checkpoint):
    with pytest.raises(ValueError, match="attn_backend.*no_such_backend"):
        _build(checkpoint, attn_backend="no_such_backend")


def test_a_backend_that_is_not_a_name_is_a_type_error(checkpoint):
    with pytest.raises(TypeError, match="attn_backend"):
        _build(checkpoint, attn_backend=3)
