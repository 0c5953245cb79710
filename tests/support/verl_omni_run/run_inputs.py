"""The inputs of a verl-omni run: a tiny Qwen-Image checkpoint with a chat template, and the prompt data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tests.support.tiny_checkpoint import tiny_pipeline

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen's chat layout (``<|im_start|>role\\ncontent<|im_end|>``), which verl-omni's agent loop applies."""

SYSTEM_PROMPT = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:"
)
"""Qwen-Image's own system prompt; the rollout drops the template prefix before the transformer."""

TRAIN_PROMPTS = ("a red cube", "two blue spheres on a long wooden table", "cat", "the word HELLO on a sign")
VAL_PROMPTS = ("a green tree", "sun")


def _rows(prompts: tuple[str, ...], split: str) -> list[dict]:
    """verl-omni's prompt rows (its Qwen-Image OCR recipe's layout), prompts of different lengths."""
    return [
        {
            "data_source": "tiny",
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
            "negative_prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": " "}],
            "ability": "text-to-image",
            "reward_model": {"style": "rule", "ground_truth": text},
            "extra_info": {"split": split, "index": index},
        }
        for index, text in enumerate(prompts)
    ]


def write_run_inputs(directory: Path) -> dict[str, Path]:
    """Write the checkpoint (``directory/model``) and ``train.parquet`` / ``val.parquet``; return their paths."""
    directory = Path(directory)
    pipeline = tiny_pipeline()
    pipeline.tokenizer.chat_template = CHAT_TEMPLATE
    pipeline.save_pretrained(directory / "model")
    paths = {"model": directory / "model", "train": directory / "train.parquet", "val": directory / "val.parquet"}
    pd.DataFrame(_rows(TRAIN_PROMPTS, "train")).to_parquet(paths["train"])
    pd.DataFrame(_rows(VAL_PROMPTS, "val")).to_parquet(paths["val"])
    return paths
