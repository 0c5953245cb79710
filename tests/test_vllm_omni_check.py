"""``qwen-image-omni check --vllm-omni`` and the plugin's import failure, in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm_omni
pytest.importorskip("vllm_omni", reason="needs vllm-omni (make test-vllm-omni)")

from qwen_image_omni.integrations.vllm_omni import PIPELINES  # noqa: E402
from qwen_image_omni.integrations.vllm_omni_features import ENGINE_FEATURES  # noqa: E402

BREAK_PLUGIN = textwrap.dedent(
    """
    import sys

    class BrokenPlugin:
        def find_spec(self, name, path=None, target=None):
            if name == "qwen_image_omni.integrations.vllm_omni":
                raise ImportError("simulated broken plugin")
            return None

    sys.meta_path.insert(0, BrokenPlugin())
    """
)


def run(code_or_args: list[str], broken: Path | None = None) -> subprocess.CompletedProcess:
    """Run a Python command line, with the plugin module made unimportable when ``broken`` is given."""
    env = dict(os.environ)
    if broken is not None:
        (broken / "sitecustomize.py").write_text(BREAK_PLUGIN)
        env["PYTHONPATH"] = os.pathsep.join([str(broken), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *code_or_args], env=env, capture_output=True, text=True, timeout=300)


CHECK = ["-m", "qwen_image_omni.cli", "check", "--vllm-omni"]


def test_check_reports_every_architecture_ours_and_every_feature():
    result = run(CHECK)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "plugin: qwen_image_omni.integrations.vllm_omni:register loaded" in result.stdout
    for architecture in PIPELINES:
        assert f"  {architecture}: qwen_image_omni.integrations.vllm_omni.{architecture} [ours]" in result.stdout
    for feature in ENGINE_FEATURES:
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(feature.name + " "))
        assert line.endswith("ours") == feature.native, line


def test_check_exits_1_when_the_plugin_fails_to_import(tmp_path):
    result = run(CHECK, broken=tmp_path)
    assert result.returncode == 1
    assert "plugin: FAIL" in result.stdout and "simulated broken plugin" in result.stdout


def test_vllm_omni_serves_its_own_pipelines_when_our_plugin_fails_to_import(tmp_path):
    """vllm-omni logs the failure and keeps its registry: never worse than without us."""
    code = (
        "from vllm_omni.plugins import load_omni_general_plugins\n"
        "from vllm_omni.diffusion.registry import DiffusionModelRegistry as R\n"
        "load_omni_general_plugins()\n"
        "print('RESOLVED', R._try_load_model_cls('QwenImagePipeline').__module__)\n"
    )
    result = run(["-c", code], broken=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESOLVED vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image" in result.stdout
    assert "simulated broken plugin" in result.stdout + result.stderr
