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
    """A saved tiny diffusers Qwen-Image checkpoint directory (``tests/support/tiny_checkpoint.py``)."""
    from tests.support.tiny_checkpoint import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-qwen-image")
    tiny_pipeline().save_pretrained(path)
    return path
