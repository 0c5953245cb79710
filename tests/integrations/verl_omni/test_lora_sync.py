"""verl-omni's FSDP LoRA weight sync with peft >= 0.21 (``qwen_image_omni/integrations/verl_omni_lora_sync.py``).

verl-omni collects the LoRA tensors it sends to the rollout one FSDP2 block at a time and asks peft
for each block's entries with block-relative keys; peft 0.21 matches entries by the model's own
module paths and finds none. Run by ``make test-verl-omni`` (verl-omni's environment has peft 0.21).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.verl_omni]
pytest.importorskip("verl_omni", reason="needs the verl-omni source on PYTHONPATH (make test-verl-omni)")

from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from verl_omni.utils import fsdp_utils  # noqa: E402

from qwen_image_omni import QwenImageTransformer2DModel  # noqa: E402
from qwen_image_omni.integrations import verl_omni_lora_sync  # noqa: E402

from tests.support.tiny_checkpoint import CHECKPOINT_TRANSFORMER_CONFIG  # noqa: E402
from tests.support.vllm_omni_engine import free_port  # noqa: E402


@pytest.fixture(scope="module")
def sharded_lora_model():
    """Our tiny transformer with a LoRA adapter (as verl-omni adds it), each block and the root FSDP2-sharded."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASTER_ADDR", "127.0.0.1")
        patch.setenv("MASTER_PORT", str(free_port()))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            model = QwenImageTransformer2DModel(**{**CHECKPOINT_TRANSFORMER_CONFIG, "num_layers": 2})
            model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k"]))
            expected = {key: value.clone() for key, value in get_peft_model_state_dict(model).items()}
            mesh = init_device_mesh("cpu", (1,))
            for block in model.transformer_blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            yield model, expected
        finally:
            torch.distributed.destroy_process_group()


def _collect(model):
    return fsdp_utils.collect_lora_params(model, layered_summon=True, base_sync_done=True, is_diffusers=True)


def test_peft_finds_nothing_in_a_block_state_dict(sharded_lora_model, monkeypatch):
    model, _ = sharded_lora_model
    monkeypatch.setattr(fsdp_utils, "get_peft_model_state_dict", get_peft_model_state_dict)
    assert get_peft_model_state_dict(model, state_dict=model.transformer_blocks[0].state_dict()) == {}
    with pytest.raises(RuntimeError, match="collected 0 parameters"):
        _collect(model)


def test_every_block_lora_tensor_is_collected_under_its_model_name(sharded_lora_model, monkeypatch):
    model, expected = sharded_lora_model
    monkeypatch.setattr(fsdp_utils, "get_peft_model_state_dict", get_peft_model_state_dict)
    verl_omni_lora_sync.install()
    collected = _collect(model)
    assert sorted(collected) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(collected[key].full_tensor() if hasattr(collected[key], "full_tensor") else collected[key], value, rtol=0, atol=0)


def test_install_is_idempotent(monkeypatch):
    monkeypatch.setattr(fsdp_utils, "get_peft_model_state_dict", get_peft_model_state_dict)
    verl_omni_lora_sync.install()
    wrapped = fsdp_utils.get_peft_model_state_dict
    verl_omni_lora_sync.install()
    assert fsdp_utils.get_peft_model_state_dict is wrapped
    assert wrapped.__wrapped__ is get_peft_model_state_dict
