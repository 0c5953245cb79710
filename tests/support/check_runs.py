"""One forward of ``check``'s runs, plain or through the legacy emulation, for the check and legacy tests."""

import torch

from qwen_image_omni.check.legacy import legacy_forward
from qwen_image_omni.check.runs import forward_kwargs


def kwargs_for(inputs, layout, prompt="pos"):
    """Forward kwargs of one CFG branch on the CPU in fp32."""
    return forward_kwargs(inputs, prompt, layout, torch.float32, torch.device("cpu"))


def run(model, kwargs, mode=None):
    """Image-token output of a plain (mode None) or legacy forward."""
    with torch.no_grad():
        if mode is None:
            return model(**kwargs)[0]
        return legacy_forward(model, mode, **kwargs)[0]
