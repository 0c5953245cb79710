"""Engines that ask for a feature our transformer lacks get vllm-omni's own pipeline, with one log line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.vllm_omni
pytest.importorskip("vllm_omni", reason="needs vllm-omni (make test-vllm-omni)")

from vllm_omni.diffusion.data import OmniDiffusionConfig  # noqa: E402
from vllm_omni.diffusion.models.qwen_image import pipeline_qwen_image  # noqa: E402

from qwen_image_omni.integrations.vllm_omni import pipelines as integration  # noqa: E402
from qwen_image_omni.integrations.vllm_omni.features import (  # noqa: E402
    ENGINE_FEATURES,
    EngineFeature,
    features_handed_to_vllm_omni,
)
from qwen_image_omni.pipelines.qwen_image_flow_grpo.vllm_omni_rollout_pipeline import (  # noqa: E402
    QwenImagePipelineWithLogProb,
)

from .test_pipelines import od_config  # noqa: E402,F401 - the module-scoped engine config fixture

LACKING = EngineFeature("Test feature", "test_option", lambda config: True, native=False, why="a test says so")


class Recorder:
    """Stands in for the integration's logger: keeps every warning."""

    def __init__(self):
        self.warnings: list[str] = []

    def warning(self, message, *args):
        self.warnings.append(message % args)


def test_a_default_engine_config_asks_for_nothing_handed_over(od_config):  # noqa: F811
    assert features_handed_to_vllm_omni(od_config) == []
    assert features_handed_to_vllm_omni(OmniDiffusionConfig()) == []


@pytest.mark.parametrize("feature", [f for f in ENGINE_FEATURES if not f.native], ids=lambda f: f.name)
def test_each_feature_ours_lacks_is_detected_from_the_engine_options(feature):
    options = {
        "Sequence parallel, ring": {"parallel_config": SimpleNamespace(ring_degree=2)},
        "Tensor parallel": {"parallel_config": SimpleNamespace(tensor_parallel_size=2)},
        "Quantization": {"quantization_config": "fp8"},
        "LoRA, distill loader": {"lora_backend": "distill"},
    }[feature.name]
    assert features_handed_to_vllm_omni(SimpleNamespace(**options)) == [feature]


@pytest.fixture
def sdpa_from_the_platform(monkeypatch):
    """Inside: the platform answers vllm-omni's SDPA backend, and vllm-omni's backend cache is empty.

    vllm-omni's transformer picks an attention backend from the platform, which raises on an
    ``UnspecifiedOmniPlatform``. vllm-omni caches the answer per process, so the cache is cleared on
    the way out too: later tests get what their own platform answers.
    """
    from vllm_omni.diffusion.attention.selector import _cached_get_backend_cls
    from vllm_omni.platforms import current_omni_platform

    sdpa = "vllm_omni.diffusion.attention.backends.sdpa.SDPABackend"
    monkeypatch.setattr(
        type(current_omni_platform), "get_diffusion_attn_backend_cls", classmethod(lambda *_, **__: sdpa)
    )
    _cached_get_backend_cls.cache_clear()
    yield
    _cached_get_backend_cls.cache_clear()


def test_pipeline_hands_the_engine_to_vllm_omni_own_pipeline_and_logs_why(
    od_config, sdpa_from_the_platform, monkeypatch  # noqa: F811
):
    recorder = Recorder()
    monkeypatch.setattr(integration, "logger", recorder)
    monkeypatch.setattr(integration, "features_handed_to_vllm_omni", lambda config: [LACKING])
    pipe = integration.QwenImagePipeline(od_config=od_config)
    assert type(pipe) is pipeline_qwen_image.QwenImagePipeline
    assert type(pipe.transformer).__module__.startswith("vllm_omni.")
    assert recorder.warnings == [
        "qwen-image-omni: serving QwenImagePipeline with vllm-omni's own transformer, as the engine asks for "
        "Test feature (test_option): a test says so"
    ]


def test_rollout_pipeline_refuses_a_feature_ours_lacks(od_config, monkeypatch):  # noqa: F811
    monkeypatch.setattr(integration, "features_handed_to_vllm_omni", lambda config: [LACKING])
    with pytest.raises(ValueError, match=r"QwenImagePipelineWithLogProb .* does not support Test feature"):
        QwenImagePipelineWithLogProb(od_config=od_config)
