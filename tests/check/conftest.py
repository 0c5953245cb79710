"""Fixtures of the ``check`` tests: the embedded tiny model and ``check``'s own inputs."""

import pytest
import torch

from qwen_image_omni.check import TINY_LATENT_GRID
from qwen_image_omni.check.runs import make_inputs
from qwen_image_omni.check.sources import tiny_source


@pytest.fixture(scope="module")
def source():
    """The embedded tiny random-weight model of ``check``."""
    return tiny_source()


@pytest.fixture(scope="module")
def inputs(source):
    """``check``'s fp32 inputs: a 37-token and a 5-token prompt, width 256."""
    return make_inputs(source.config, TINY_LATENT_GRID, torch.float32)
