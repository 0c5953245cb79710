"""Registries, dispatch helpers and DiffusionModelConfig of qwen_image_omni.pipelines."""

from __future__ import annotations

import importlib
import inspect
import json
import sys

import pytest

from qwen_image_omni import pipelines
from qwen_image_omni.pipelines import model_base
from qwen_image_omni.pipelines import (
    DiffusionAlgoConfig,
    DiffusionModelBase,
    DiffusionModelConfig,
    DiffusionPipelineConfig,
    VllmOmniPipelineBase,
)
from qwen_image_omni.pipelines.sd3_dpo import StableDiffusion3DPO


@pytest.fixture(autouse=True)
def isolated_registries(monkeypatch):
    """Each test registers into copies of the registries, restored afterwards."""
    monkeypatch.setattr(DiffusionModelBase, "_registry", dict(DiffusionModelBase._registry))
    monkeypatch.setattr(VllmOmniPipelineBase, "_registry", dict(VllmOmniPipelineBase._registry))
    monkeypatch.setattr(VllmOmniPipelineBase, "_vllm_omni_registry", dict(VllmOmniPipelineBase._vllm_omni_registry))


def make_adapter(calls: list | None = None) -> type[DiffusionModelBase]:
    """A complete adapter whose methods record their keyword arguments in ``calls``."""
    calls = [] if calls is None else calls

    class Recorder(DiffusionModelBase):
        @classmethod
        def build_scheduler(cls, model_config):
            calls.append(("build_scheduler", {"model_config": model_config}))
            return "scheduler"

        @classmethod
        def set_timesteps(cls, scheduler, model_config, device):
            calls.append(("set_timesteps", {"scheduler": scheduler, "model_config": model_config, "device": device}))

        @classmethod
        def prepare_model_inputs(cls, **kwargs):
            calls.append(("prepare_model_inputs", kwargs))
            return {"x": 1}, None

        @classmethod
        def forward_and_sample_previous_step(cls, **kwargs):
            calls.append(("forward_and_sample_previous_step", kwargs))
            return ("log_prob", "mean", "std", "sqrt_dt")

    return Recorder


# ----------------------------------------------------------------------------- DiffusionModelBase


def test_register_and_get_class():
    adapter = DiffusionModelBase.register("TestPipeline", "flow_grpo")(make_adapter())
    config = DiffusionModelConfig(architecture="TestPipeline")
    assert DiffusionModelBase.get_class(config) is adapter
    assert ("TestPipeline", "flow_grpo") in DiffusionModelBase.registered()


def test_builtin_sd3_dpo_adapter_is_registered():
    config = DiffusionModelConfig(architecture="StableDiffusion3Pipeline", algorithm="dpo")
    assert DiffusionModelBase.get_class(config) is StableDiffusion3DPO


def test_same_architecture_different_algorithms_are_distinct():
    grpo = DiffusionModelBase.register("TestPipeline", "flow_grpo")(make_adapter())
    mix = DiffusionModelBase.register("TestPipeline", "mix_grpo")(make_adapter())
    assert DiffusionModelBase.get_class(DiffusionModelConfig(architecture="TestPipeline")) is grpo
    config = DiffusionModelConfig(architecture="TestPipeline", algorithm="mix_grpo")
    assert DiffusionModelBase.get_class(config) is mix


def test_get_class_error_lists_registered_keys():
    DiffusionModelBase.register("TestPipeline", "flow_grpo")(make_adapter())
    config = DiffusionModelConfig(architecture="TestPipeline", algorithm="nope")
    with pytest.raises(NotImplementedError) as info:
        DiffusionModelBase.get_class(config)
    message = str(info.value)
    assert "'TestPipeline'" in message and "'nope'" in message
    assert "('TestPipeline', 'flow_grpo')" in message
    assert "('StableDiffusion3Pipeline', 'dpo')" in message


def test_register_same_class_twice_is_a_noop():
    adapter = make_adapter()
    DiffusionModelBase.register("TestPipeline", "flow_grpo")(adapter)
    assert DiffusionModelBase.register("TestPipeline", "flow_grpo")(adapter) is adapter
    assert DiffusionModelBase.get_class(DiffusionModelConfig(architecture="TestPipeline")) is adapter


def test_register_different_class_under_taken_key_raises():
    DiffusionModelBase.register("TestPipeline", "flow_grpo")(make_adapter())
    other = make_adapter()
    other.__qualname__ = "OtherAdapter"
    with pytest.raises(ValueError, match=r"already registered to .*Recorder; cannot register .*OtherAdapter"):
        DiffusionModelBase.register("TestPipeline", "flow_grpo")(other)


def test_module_reload_reregisters_without_error(tmp_path, monkeypatch):
    (tmp_path / "reloadable_adapter.py").write_text(
        inspect.cleandoc(
            """
            from qwen_image_omni.pipelines import DiffusionModelBase, VllmOmniPipelineBase

            @DiffusionModelBase.register("ReloadPipeline", "flow_grpo")
            class Adapter(DiffusionModelBase):
                @classmethod
                def build_scheduler(cls, model_config): ...
                @classmethod
                def set_timesteps(cls, scheduler, model_config, device): ...
                @classmethod
                def prepare_model_inputs(cls, *args, **kwargs): ...
                @classmethod
                def forward_and_sample_previous_step(cls, *args, **kwargs): ...

            @VllmOmniPipelineBase.register("ReloadPipeline", "flow_grpo")
            class Pipeline:
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("reloadable_adapter")
    try:
        first = module.Adapter
        module = importlib.reload(module)
        assert module.Adapter is not first
        config = DiffusionModelConfig(architecture="ReloadPipeline")
        assert DiffusionModelBase.get_class(config) is module.Adapter
        assert VllmOmniPipelineBase.get_class("ReloadPipeline", "flow_grpo") is module.Pipeline
    finally:
        sys.modules.pop("reloadable_adapter", None)


def test_register_rejects_incomplete_adapter():
    class Partial(DiffusionModelBase):
        @classmethod
        def build_scheduler(cls, model_config):
            return None

    with pytest.raises(TypeError, match=r"does not implement \['forward_and_sample_previous_step', "):
        DiffusionModelBase.register("TestPipeline", "flow_grpo")(Partial)


def test_register_rejects_non_adapter_and_bad_keys():
    with pytest.raises(TypeError, match="expects a DiffusionModelBase subclass"):
        DiffusionModelBase.register("TestPipeline", "flow_grpo")(object)
    with pytest.raises(TypeError, match="architecture must be a non-empty str"):
        DiffusionModelBase.register("", "flow_grpo")
    with pytest.raises(TypeError, match="algorithm must be a non-empty str, got NoneType"):
        DiffusionModelBase.register("TestPipeline", None)


def test_base_methods_are_abstract_classmethods_without_length_arguments():
    assert DiffusionModelBase.__abstractmethods__ == {
        "build_scheduler",
        "set_timesteps",
        "prepare_model_inputs",
        "forward_and_sample_previous_step",
    }
    for name in DiffusionModelBase.__abstractmethods__:
        parameters = inspect.signature(getattr(DiffusionModelBase, name)).parameters
        assert not any("seq_len" in p for p in parameters), name
    prepare = list(inspect.signature(DiffusionModelBase.prepare_model_inputs).parameters)
    assert prepare == [
        "module",
        "model_config",
        "latents",
        "timesteps",
        "prompt_embeds",
        "prompt_embeds_mask",
        "negative_prompt_embeds",
        "negative_prompt_embeds_mask",
        "micro_batch",
        "step",
    ]


# ----------------------------------------------------------------------------- VllmOmniPipelineBase


def test_vllm_omni_registry_lookup_and_dotted_path():
    @VllmOmniPipelineBase.register("TestPipeline", "flow_grpo")
    class TestPipelineWithLogProb:
        pass

    assert VllmOmniPipelineBase.get_class("TestPipeline", "flow_grpo") is TestPipelineWithLogProb
    path = VllmOmniPipelineBase.get_pipeline_path("TestPipeline", "flow_grpo")
    assert path == f"{__name__}.test_vllm_omni_registry_lookup_and_dotted_path.<locals>.TestPipelineWithLogProb"
    assert VllmOmniPipelineBase.get_class("TestPipeline", "dpo") is None
    assert VllmOmniPipelineBase.get_pipeline_path("Unknown", "flow_grpo") is None
    assert ("TestPipeline", "flow_grpo") in VllmOmniPipelineBase.registered()


def test_vllm_omni_dotted_path_imports_back():
    VllmOmniPipelineBase.register("TestPipeline", "flow_grpo")(DiffusionPipelineConfig)
    path = VllmOmniPipelineBase.get_pipeline_path("TestPipeline", "flow_grpo")
    module_name, _, class_name = path.rpartition(".")
    assert getattr(importlib.import_module(module_name), class_name) is DiffusionPipelineConfig


def test_vllm_omni_registry_conflicts_and_type_checks():
    class A:
        pass

    class B:
        pass

    VllmOmniPipelineBase.register("TestPipeline", "flow_grpo")(A)
    VllmOmniPipelineBase.register("TestPipeline", "flow_grpo")(A)  # same class: no-op
    with pytest.raises(ValueError, match="vllm-omni pipeline .* already registered"):
        VllmOmniPipelineBase.register("TestPipeline", "flow_grpo")(B)
    with pytest.raises(TypeError, match="expects a class"):
        VllmOmniPipelineBase.register("TestPipeline", "dpo")(lambda: None)


BUILT_IN_ROLLOUT_PIPELINES = {
    ("QwenImagePipeline", "flow_grpo"): "qwen_image_flow_grpo.{}.QwenImagePipelineWithLogProb",
    ("QwenImagePipeline", "mix_grpo"): "qwen_image_mix_grpo.{}.QwenImageMixGRPOPipelineWithLogProb",
    ("QwenImagePipeline", "dpo"): "qwen_image_dpo.{}.QwenImageDPOPipeline",
    ("QwenImagePipeline", "diffusion_nft"): "qwen_image_diffusion_nft.{}.QwenImageDiffusionNFTPipeline",
    ("QwenImagePipeline", "dual_grpo"): "qwen_image_dual_grpo.{}.QwenImagePipelineWithDualLogProb",
    ("QwenImageEditPlusPipeline", "flow_grpo"): "qwen_image_edit_flow_grpo.{}.QwenImageEditPlusPipelineWithLogProb",
}
"""What ``get_pipeline_path`` answers per built-in key (under ``qwen_image_omni.pipelines.``), ``{}`` the
module: ``diffusers_rollout_pipeline`` without vllm-omni, ``vllm_omni_rollout_pipeline`` with it."""


@pytest.mark.parametrize("with_vllm_omni", [False, True], ids=["without-vllm-omni", "with-vllm-omni"])
def test_builtin_rollout_pipeline_paths(monkeypatch, with_vllm_omni):
    """The answers the configs name, whether or not vllm-omni is installed; looking them up imports nothing."""
    monkeypatch.setattr(model_base, "vllm_omni_installed", lambda: with_vllm_omni)
    module = "vllm_omni_rollout_pipeline" if with_vllm_omni else "diffusers_rollout_pipeline"
    before = set(sys.modules)
    for key, path in BUILT_IN_ROLLOUT_PIPELINES.items():
        expected = "qwen_image_omni.pipelines." + path.format(module)
        assert VllmOmniPipelineBase.get_pipeline_path(*key) == expected
    assert set(sys.modules) == before
    assert set(VllmOmniPipelineBase.registered()) >= set(BUILT_IN_ROLLOUT_PIPELINES)


def test_builtin_diffusers_rollout_pipelines_answer_their_former_names(monkeypatch):
    """Without vllm-omni each key gives the diffusers pipeline, ``Diffusers<name>``, by the path of its former name."""
    monkeypatch.setattr(model_base, "vllm_omni_installed", lambda: False)
    for key, path in BUILT_IN_ROLLOUT_PIPELINES.items():
        cls = VllmOmniPipelineBase.get_class(*key)
        full_path = "qwen_image_omni.pipelines." + path.format("diffusers_rollout_pipeline")
        module_name, _, old_name = full_path.rpartition(".")
        module = importlib.import_module(module_name)
        assert cls is getattr(module, old_name) and cls.__name__ == f"Diffusers{old_name}"
        assert cls.__module__ == module_name


def test_register_paths_imports_nothing_until_a_class_is_asked_for(tmp_path, monkeypatch):
    (tmp_path / "lazy_rollout.py").write_text("class Rollout:\n    pass\n\nclass ServedRollout(Rollout):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_rollout", raising=False)
    VllmOmniPipelineBase.register_paths(
        "LazyPipeline", "flow_grpo", diffusers="lazy_rollout.Rollout", vllm_omni="lazy_rollout.ServedRollout"
    )
    try:
        monkeypatch.setattr(model_base, "vllm_omni_installed", lambda: False)
        assert VllmOmniPipelineBase.get_pipeline_path("LazyPipeline", "flow_grpo") == "lazy_rollout.Rollout"
        monkeypatch.setattr(model_base, "vllm_omni_installed", lambda: True)
        assert VllmOmniPipelineBase.get_pipeline_path("LazyPipeline", "flow_grpo") == "lazy_rollout.ServedRollout"
        assert "lazy_rollout" not in sys.modules
        assert VllmOmniPipelineBase.get_class("LazyPipeline", "flow_grpo") is sys.modules["lazy_rollout"].ServedRollout
        monkeypatch.setattr(model_base, "vllm_omni_installed", lambda: False)
        assert VllmOmniPipelineBase.get_class("LazyPipeline", "flow_grpo") is sys.modules["lazy_rollout"].Rollout
    finally:
        sys.modules.pop("lazy_rollout", None)


def test_a_vllm_omni_only_key_answers_none_without_vllm_omni(monkeypatch):
    VllmOmniPipelineBase.register_paths("ServedPipeline", "flow_grpo", vllm_omni="somewhere.Served")
    monkeypatch.setattr(model_base, "vllm_omni_installed", lambda: False)
    assert VllmOmniPipelineBase.get_pipeline_path("ServedPipeline", "flow_grpo") is None
    assert VllmOmniPipelineBase.get_class("ServedPipeline", "flow_grpo") is None
    assert ("ServedPipeline", "flow_grpo") in VllmOmniPipelineBase.registered()


def test_register_paths_conflicts_and_checks(monkeypatch):
    VllmOmniPipelineBase.register_paths("TestPipeline", "flow_grpo", diffusers="a.Rollout", vllm_omni="a.Served")
    VllmOmniPipelineBase.register_paths("TestPipeline", "flow_grpo", diffusers="a.Rollout", vllm_omni="a.Served")
    with pytest.raises(ValueError, match=r"already registered to a\.Served; cannot register b\.Served"):
        VllmOmniPipelineBase.register_paths("TestPipeline", "flow_grpo", vllm_omni="b.Served")
    VllmOmniPipelineBase.register_paths("TestPipeline", "flow_grpo", vllm_omni="b.Served", replace=True)
    monkeypatch.setattr(model_base, "vllm_omni_installed", lambda: True)
    assert VllmOmniPipelineBase.get_pipeline_path("TestPipeline", "flow_grpo") == "b.Served"
    with pytest.raises(ValueError, match="already registered to a.Rollout"):
        VllmOmniPipelineBase.register("TestPipeline", "flow_grpo")(DiffusionPipelineConfig)
    for bad in ("Rollout", "", 3):
        with pytest.raises(TypeError, match="dotted path"):
            VllmOmniPipelineBase.register_paths("TestPipeline", "dpo", diffusers=bad)
    with pytest.raises(TypeError, match="non-empty str"):
        VllmOmniPipelineBase.register_paths("", "dpo", diffusers="a.Rollout")


def test_get_class_names_a_path_that_does_not_import(monkeypatch):
    monkeypatch.setattr(model_base, "vllm_omni_installed", lambda: True)
    VllmOmniPipelineBase.register_paths("BrokenPipeline", "flow_grpo", vllm_omni="no_such_module_xyz.Served")
    with pytest.raises(ImportError, match=r"\('BrokenPipeline', 'flow_grpo'\), no_such_module_xyz\.Served, cannot be"):
        VllmOmniPipelineBase.get_class("BrokenPipeline", "flow_grpo")
    VllmOmniPipelineBase.register_paths("BrokenPipeline", "dpo", vllm_omni="qwen_image_omni.pipelines.NoSuchClass")
    with pytest.raises(ImportError, match="has no attribute 'NoSuchClass'"):
        VllmOmniPipelineBase.get_class("BrokenPipeline", "dpo")


# ----------------------------------------------------------------------------- utils dispatch


def test_utils_dispatch_to_registered_adapter():
    calls: list = []
    DiffusionModelBase.register("TestPipeline", "flow_grpo")(make_adapter(calls))
    config = DiffusionModelConfig(architecture="TestPipeline")

    assert pipelines.build_scheduler(config) == "scheduler"
    pipelines.set_timesteps("scheduler", config, device="meta")
    pipelines.set_timesteps("scheduler", config)
    inputs = pipelines.prepare_model_inputs("module", config, "lat", "ts", "pe", "pm", "npe", "npm", {"k": 1}, 3)
    result = pipelines.forward_and_sample_previous_step("module", "scheduler", config, {"x": 1}, None, {"s": 2}, 4)

    assert inputs == ({"x": 1}, None)
    assert result == ("log_prob", "mean", "std", "sqrt_dt")
    names = [name for name, _ in calls]
    assert names == [
        "build_scheduler",
        "set_timesteps",
        "set_timesteps",
        "prepare_model_inputs",
        "forward_and_sample_previous_step",
    ]
    assert calls[1][1]["device"] == "meta"
    assert calls[2][1]["device"] == pipelines.default_device()
    assert calls[3][1] == dict(
        module="module",
        model_config=config,
        latents="lat",
        timesteps="ts",
        prompt_embeds="pe",
        prompt_embeds_mask="pm",
        negative_prompt_embeds="npe",
        negative_prompt_embeds_mask="npm",
        micro_batch={"k": 1},
        step=3,
    )
    assert calls[4][1] == dict(
        module="module",
        scheduler="scheduler",
        model_config=config,
        model_inputs={"x": 1},
        negative_model_inputs=None,
        scheduler_inputs={"s": 2},
        step=4,
    )


def test_utils_reject_txt_seq_lens():
    DiffusionModelBase.register("TestPipeline", "flow_grpo")(make_adapter())
    config = DiffusionModelConfig(architecture="TestPipeline")
    with pytest.raises(TypeError, match="txt_seq_lens"):
        pipelines.prepare_model_inputs("m", config, "l", "t", "p", None, None, None, {}, 0, txt_seq_lens=[3])


def test_utils_unknown_adapter_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="registered: "):
        pipelines.build_scheduler(DiffusionModelConfig(architecture="NoSuchPipeline"))


# ----------------------------------------------------------------------------- DiffusionModelConfig


def test_config_defaults():
    config = DiffusionModelConfig(architecture="QwenImagePipeline")
    assert config.algorithm == "flow_grpo"
    assert config.local_path is None
    assert config.pipeline == DiffusionPipelineConfig(
        height=512, width=512, num_inference_steps=10, true_cfg_scale=1.0, guidance_scale=None, max_sequence_length=512
    )
    assert config.algo == DiffusionAlgoConfig(
        noise_level=1.0, sde_type="sde", sde_window_size=None, sde_window_range=None
    )


def test_config_from_nested_dict():
    config = DiffusionModelConfig.from_dict(
        {
            "_target_": "ignored.by.from_dict",
            "architecture": "QwenImagePipeline",
            "algorithm": "mix_grpo",
            "pipeline": {"height": 256, "width": 384, "num_inference_steps": 6, "true_cfg_scale": 4},
            "algo": {"noise_level": 0.7, "sde_type": "cps", "sde_window_size": 2, "sde_window_range": [0, 5]},
        }
    )
    assert config.algorithm == "mix_grpo"
    assert isinstance(config.pipeline, DiffusionPipelineConfig)
    assert (config.pipeline.height, config.pipeline.width, config.pipeline.num_inference_steps) == (256, 384, 6)
    assert config.pipeline.true_cfg_scale == 4.0 and isinstance(config.pipeline.true_cfg_scale, float)
    assert config.pipeline.max_sequence_length == 512
    assert isinstance(config.algo, DiffusionAlgoConfig)
    assert config.algo.sde_type == "cps"
    assert config.algo.sde_window_range == (0, 5)
    assert DiffusionModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "data, names",
    [
        ({"architecture": "X", "txt_seq_lens": [3], "colour": 1}, "['colour', 'txt_seq_lens']"),
        ({"architecture": "X", "pipeline": {"heigth": 64}}, "pipeline: ['heigth']"),
        ({"architecture": "X", "algo": {"noise": 0.5}}, "algo: ['noise']"),
    ],
)
def test_config_from_dict_unknown_keys(data, names):
    with pytest.raises(ValueError, match=r"unknown key\(s\) in .*" + names.replace("[", r"\[").replace("]", r"\]")):
        DiffusionModelConfig.from_dict(data)


def test_config_from_dict_requires_mapping():
    with pytest.raises(TypeError, match="pipeline must be a DiffusionPipelineConfig or a mapping, got list"):
        DiffusionModelConfig.from_dict({"architecture": "X", "pipeline": [1, 2]})
    with pytest.raises(TypeError, match="DiffusionModelConfig must be a mapping, got str"):
        DiffusionModelConfig.from_dict("QwenImagePipeline")


def write_model_dir(path, index):
    """A minimal diffusers pipeline directory: just model_index.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps(index) if not isinstance(index, str) else index)
    return path


def test_config_reads_architecture_from_model_index(tmp_path):
    model_dir = write_model_dir(
        tmp_path / "qwen", {"_class_name": "QwenImagePipeline", "_diffusers_version": "0.35.0", "vae": ["x", "y"]}
    )
    config = DiffusionModelConfig(local_path=model_dir)
    assert config.architecture == "QwenImagePipeline"
    assert config.local_path == str(model_dir)
    from_dict = DiffusionModelConfig.from_dict({"local_path": str(model_dir), "algorithm": "dpo"})
    assert from_dict.architecture == "QwenImagePipeline"


def test_explicit_architecture_wins_over_model_index(tmp_path):
    model_dir = write_model_dir(tmp_path / "m", {"_class_name": "QwenImagePipeline"})
    config = DiffusionModelConfig(architecture="StableDiffusion3Pipeline", local_path=str(model_dir))
    assert config.architecture == "StableDiffusion3Pipeline"


def test_config_architecture_errors(tmp_path):
    with pytest.raises(ValueError, match="needs architecture .* or a local_path"):
        DiffusionModelConfig()
    with pytest.raises(ValueError, match=r"model_index.json does not exist"):
        DiffusionModelConfig(local_path=str(tmp_path / "missing"))
    no_name = write_model_dir(tmp_path / "no_name", {"_diffusers_version": "0.35.0"})
    with pytest.raises(ValueError, match=r"has no '_class_name' string \(got None\)"):
        DiffusionModelConfig(local_path=str(no_name))
    broken = write_model_dir(tmp_path / "broken", "{not json")
    with pytest.raises(ValueError, match="cannot read .*model_index.json"):
        DiffusionModelConfig(local_path=str(broken))
    with pytest.raises(ValueError, match="algorithm must be a non-empty str, got ''"):
        DiffusionModelConfig(architecture="X", algorithm="")


@pytest.mark.parametrize(
    "pipeline, algo, error, message",
    [
        ({"num_inference_steps": 0}, {}, ValueError, "pipeline.num_inference_steps must be >= 1, got 0"),
        ({"height": -8}, {}, ValueError, "pipeline.height must be >= 1, got -8"),
        ({"width": 512.0}, {}, TypeError, "pipeline.width must be an int, got float 512.0"),
        (
            {"height": 500},
            {},
            ValueError,
            r"^pipeline.height must be a multiple of 16 \(VAE scale factor 8 x 2x2 latent patches\), got 500; "
            "try 496 or 512$",
        ),
        ({"width": 8}, {}, ValueError, r"^pipeline.width must be a multiple of 16 .*, got 8; try 16$"),
        ({"num_inference_steps": True}, {}, TypeError, "pipeline.num_inference_steps must be an int, got bool"),
        ({"true_cfg_scale": "4"}, {}, TypeError, "pipeline.true_cfg_scale must be a number, got str '4'"),
        ({"true_cfg_scale": -1.0}, {}, ValueError, "pipeline.true_cfg_scale must be a finite number >= 0.0, got -1.0"),
        ({"guidance_scale": float("nan")}, {}, ValueError, "pipeline.guidance_scale must be a finite number"),
        ({"max_sequence_length": 0}, {}, ValueError, "pipeline.max_sequence_length must be >= 1, got 0"),
        ({}, {"sde_type": "ode"}, ValueError, r"algo.sde_type must be one of \['sde', 'cps', 'dance_sde'\], got 'ode'"),
        ({}, {"noise_level": -0.1}, ValueError, "algo.noise_level must be a finite number >= 0.0, got -0.1"),
        ({}, {"noise_level": float("nan")}, ValueError, "^algo.noise_level must be a finite number >= 0.0, got nan$"),
        (
            {},
            {"noise_level": 1.5, "sde_type": "cps"},
            ValueError,
            r"^algo.noise_level must be <= 1 for sde_type='cps' \(its noise std is sigma' \* sin\(noise_level \* pi / 2\)\), "
            "got 1.5$",
        ),
        ({}, {"sde_window_size": 0}, ValueError, "algo.sde_window_size must be >= 1, got 0"),
        ({}, {"sde_window_range": [3]}, ValueError, "algo.sde_window_range must be a pair"),
        ({}, {"sde_window_range": [4, 2]}, ValueError, "start < end, got \\(4, 2\\)"),
        ({}, {"sde_window_range": [-1, 2]}, ValueError, "algo.sde_window_range\\[0\\] must be >= 0, got -1"),
        (
            {},
            {"sde_window_size": 4, "sde_window_range": [0, 3]},
            ValueError,
            "spans 3 steps, fewer than algo.sde_window_size=4",
        ),
        (
            {"num_inference_steps": 4},
            {"sde_window_size": 5},
            ValueError,
            "algo.sde_window_size=5 exceeds pipeline.num_inference_steps=4",
        ),
        (
            {"num_inference_steps": 4},
            {"sde_window_range": [0, 6]},
            ValueError,
            "ends past pipeline.num_inference_steps=4",
        ),
    ],
)
def test_config_validation_messages(pipeline, algo, error, message):
    with pytest.raises(error, match=message):
        DiffusionModelConfig.from_dict({"architecture": "QwenImagePipeline", "pipeline": pipeline, "algo": algo})


def test_valid_sde_window_is_accepted():
    config = DiffusionModelConfig(
        architecture="QwenImagePipeline",
        pipeline=DiffusionPipelineConfig(num_inference_steps=10),
        algo=DiffusionAlgoConfig(sde_type="dance_sde", sde_window_size=3, sde_window_range=(2, 10)),
    )
    assert config.algo.sde_window_range == (2, 10)
