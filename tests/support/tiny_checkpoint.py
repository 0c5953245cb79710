"""A tiny random diffusers Qwen-Image checkpoint, built offline (shared by the generate and vllm-omni tests).

A real ``QwenImagePipeline.save_pretrained`` directory: diffusers' transformer class (so
``model_index.json`` names diffusers, as a released checkpoint does), a tiny
``AutoencoderKLQwenImage``, a tiny ``Qwen2_5_VLForConditionalGeneration`` text encoder, a byte-level
``Qwen2Tokenizer`` holding all 256 bytes and the chat special tokens, and the default scheduler.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageControlNetModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel as DiffusersTransformer,
)
from tokenizers import AddedToken
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from tests.support.tiny import TINY_CONFIG

TEXT_DIM = 32  # the text encoder's hidden size = the transformer's joint_attention_dim
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHECKPOINT_TRANSFORMER_CONFIG = {**TINY_CONFIG, "num_layers": 1, "joint_attention_dim": TEXT_DIM}


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (what ByteLevel pre-tokenizers emit)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE without merges: one token per byte, so any text encodes, plus special tokens."""
    vocab = {char: i for i, char in enumerate(byte_level_alphabet())}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    return tokenizer


def tiny_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """1-layer Qwen2.5-VL with hidden size :data:`TEXT_DIM` and a 1-block vision tower."""
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }
    config = Qwen2_5_VLConfig(
        text_config={
            **ids,
            "hidden_size": TEXT_DIM,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            # head_dim 16: the multimodal RoPE sections cover its 8 frequencies.
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            "rope_theta": 1e6,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32},
        **ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_pipeline() -> QwenImagePipeline:
    """All five components, random weights from seed 0, on the CPU in fp32."""
    torch.manual_seed(0)
    # tests/support/tiny.py's shapes (in_channels 16 = VAE z_dim 4 x the 2x2 latent patch), one block, TEXT_DIM text.
    transformer = DiffusersTransformer(**CHECKPOINT_TRANSFORMER_CONFIG)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 8x spatial, as Qwen-Image: sizes are multiples of 16
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    tokenizer = tiny_tokenizer()
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )


def tiny_vae(input_channels: int = 3, z_dim: int = 4) -> AutoencoderKLQwenImage:
    """The VAE of :func:`tiny_pipeline` (random weights from the current RNG).

    ``input_channels=4`` is Qwen-Image-Layered's RGBA VAE; its pipeline takes a 4-channel image for latents when
    ``z_dim`` is 4 too, so Layered needs another ``z_dim`` (and a transformer with ``in_channels = 4 * z_dim``).
    """
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
        input_channels=input_channels,
    )


def tiny_controlnet(extra_condition_channels: int = 0, seed: int = 0) -> QwenImageControlNetModel:
    """A 1-block ControlNet for ``tests/support/tiny.py``'s transformer shapes with :data:`TEXT_DIM` text.

    ``extra_condition_channels=4`` is ControlNet-inpaint's packed mask channel.
    """
    torch.manual_seed(seed)
    controlnet = QwenImageControlNetModel(
        **CHECKPOINT_TRANSFORMER_CONFIG, extra_condition_channels=extra_condition_channels
    ).eval()
    # diffusers zero-initialises the control projections; random ones make the residuals reach the transformer.
    with torch.no_grad():
        for module in [*controlnet.controlnet_blocks, controlnet.controlnet_x_embedder]:
            for param in module.parameters():
                param.normal_(0.0, 0.05)
    return controlnet
