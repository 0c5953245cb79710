"""Test set-up shared by the whole suite.

Without a GPU, Triton kernels run in the interpreter: ``TRITON_INTERPRET`` must be set before any
module that defines kernels is imported, so it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _stand_in_for_verl_chat_template() -> None:
    """Give the registry's verl 0.9.1 the one module verl-omni main imports from a newer verl.

    verl-omni main pins verl at a git commit (not on the registry) that has
    ``verl.utils.chat_template``; importing ``verl_omni.pipelines`` reaches it through verl-omni's
    agent loops, which these tests never run. The stand-in forwards to the tokenizer's own
    ``apply_chat_template``. Nothing happens without verl, or with a verl that has the module.
    """
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("verl") is None or importlib.util.find_spec("verl.utils.chat_template") is not None:
        return
    import verl.utils

    def apply_chat_template(processor, messages, **kwargs):
        return processor.apply_chat_template(messages, **kwargs)

    module = types.ModuleType("verl.utils.chat_template", _stand_in_for_verl_chat_template.__doc__)
    module.apply_chat_template = apply_chat_template
    sys.modules[module.__name__] = module
    verl.utils.chat_template = module


_stand_in_for_verl_chat_template()


def pytest_collection_modifyitems(config, items):
    """Skip `cuda`-marked tests on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny diffusers Qwen-Image checkpoint directory (``tests/tiny_checkpoint.py``)."""
    from .tiny_checkpoint import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-qwen-image")
    tiny_pipeline().save_pretrained(path)
    return path
