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
from qwen_image_omni.integrations.vllm_omni.features import ENGINE_FEATURES  # noqa: E402

PLUGIN = "qwen_image_omni.integrations.vllm_omni"
"""The entry point's module: it imports nothing of vllm-omni itself."""
PIPELINES_MODULE = f"{PLUGIN}.pipelines"
"""What ``register()`` imports, and what fails on a vllm-omni our pipelines do not fit."""

BREAK_PLUGIN = textwrap.dedent(
    """
    import sys

    class BrokenPlugin:
        def find_spec(self, name, path=None, target=None):
            if name == {module!r}:
                raise ImportError("simulated broken plugin")
            return None

    sys.meta_path.insert(0, BrokenPlugin())
    """
)


def run(
    code_or_args: list[str], broken: Path | None = None, module: str = PIPELINES_MODULE
) -> subprocess.CompletedProcess:
    """Run a Python command line, with ``module`` made unimportable when ``broken`` (a directory) is given."""
    env = dict(os.environ)
    if broken is not None:
        (broken / "sitecustomize.py").write_text(BREAK_PLUGIN.format(module=module))
        env["PYTHONPATH"] = os.pathsep.join([str(broken), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *code_or_args], env=env, capture_output=True, text=True, timeout=300)


CHECK = ["-m", "qwen_image_omni.cli", "check", "--vllm-omni"]


def test_check_reports_every_architecture_ours_and_every_feature():
    result = run(CHECK)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "plugin: qwen_image_omni.integrations.vllm_omni:register loaded" in result.stdout
    for architecture in PIPELINES:
        assert f"  {architecture}: {PIPELINES_MODULE}.{architecture} [ours]" in result.stdout
    for feature in ENGINE_FEATURES:
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(feature.name + " "))
        assert line.endswith("ours") == feature.native, line


def test_check_exits_1_when_the_plugin_fails_to_import(tmp_path):
    result = run(CHECK, broken=tmp_path)
    assert result.returncode == 1
    assert "plugin: FAIL" in result.stdout and "simulated broken plugin" in result.stdout


@pytest.mark.parametrize("module", [PIPELINES_MODULE, PLUGIN], ids=["pipelines", "entry-point"])
def test_vllm_omni_serves_its_own_pipelines_when_our_plugin_fails_to_import(tmp_path, module):
    """The failure is logged and vllm-omni keeps its registry: never worse than without us.

    Our pipelines failing to import (a vllm-omni they do not fit) fails inside ``register()``, which
    logs it as vllm-omni logs a plugin that fails to load (vllm-omni does not catch what a plugin
    function raises); the entry point's module failing is caught by vllm-omni's loader itself.
    """
    code = (
        "from vllm_omni.plugins import load_omni_general_plugins\n"
        "from vllm_omni.diffusion.registry import DiffusionModelRegistry as R\n"
        "load_omni_general_plugins()\n"
        "print('RESOLVED', R._try_load_model_cls('QwenImagePipeline').__module__)\n"
    )
    result = run(["-c", code], broken=tmp_path, module=module)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESOLVED vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image" in result.stdout
    assert "simulated broken plugin" in result.stdout + result.stderr


def test_the_entry_point_loads_no_rl_pipeline():
    """vllm-omni loads the plugin in every process; it imports nothing of the RL stack (``qwen_image_omni.pipelines``).

    The RL rollout pipelines are imported when an engine asks for one by its dotted path.
    """
    code = textwrap.dedent(
        """
        import sys
        from importlib.metadata import entry_points

        (plugin,) = [ep for ep in entry_points(group="vllm_omni.general_plugins") if ep.name == "qwen_image_omni"]
        plugin.load()()
        from vllm_omni.diffusion.registry import DiffusionModelRegistry

        print("SERVES", DiffusionModelRegistry._try_load_model_cls("QwenImagePipeline").__module__)
        print("LOADED", sorted(name for name in sys.modules if name.startswith("qwen_image_omni.pipelines")))
        """
    )
    result = run(["-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"SERVES {PIPELINES_MODULE}" in result.stdout
    assert "LOADED []" in result.stdout
