"""The package's shape: no import circle, one name per class, a light vllm-omni entry point.

Read from the source with ``ast`` (nothing is imported), so modules whose optional dependencies
(vllm-omni, verl-omni, triton) are missing here are covered too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import qwen_image_omni

PACKAGE_DIR = Path(qwen_image_omni.__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_time_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported.

    Module level, including ``if`` / ``try`` / ``with`` blocks and class bodies; not function bodies
    (they run when called) and not ``if TYPE_CHECKING:`` blocks.
    """
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(statements: list[ast.stmt]) -> None:
        for statement in statements:
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                found.append(statement)
            elif isinstance(statement, ast.If):
                if not _is_type_checking(statement.test):
                    walk(statement.body)
                walk(statement.orelse)
            elif isinstance(statement, ast.Try):
                walk(statement.body)
                for handler in statement.handlers:
                    walk(handler.body)
                walk(statement.orelse)
                walk(statement.finalbody)
            elif isinstance(statement, (ast.With, ast.ClassDef)):
                walk(statement.body)

    walk(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at import time.

    ``from X import Y`` depends on ``X.Y`` when that is a module, else on ``X``. Importing a
    submodule also runs its parent packages' ``__init__``; those implicit edges are left out (every
    package whose ``__init__`` imports its children would otherwise be a circle).
    """
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in import_time_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    edges.add(f"{target}.{alias.name}")
                elif target in modules:
                    edges.add(target)
        graph[name] = edges - {name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return path[path.index(imported) :] + [imported]
            if imported not in state and (circle := visit(imported)):
                return circle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module)):
            return circle
    return None


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert f"{PACKAGE}.integrations.vllm_omni.pipelines" in graph
    assert f"{PACKAGE}.models.transformer_qwenimage" in graph[f"{PACKAGE}.integrations.vllm_omni.teacache"]
    assert f"{PACKAGE}.integrations.vllm_omni.pipelines" in graph[
        f"{PACKAGE}.pipelines.qwen_image_flow_grpo.vllm_omni_rollout_pipeline"
    ]


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_anywhere_in_the_package():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_vllm_omni_integration_imports_nothing_of_the_rl_stack():
    """The plugin's modules never import ``qwen_image_omni.pipelines`` at import time (the rollout
    pipelines on vllm-omni import the plugin's pipelines, not the other way round)."""
    graph = import_graph()
    plugin = f"{PACKAGE}.integrations.vllm_omni"
    reached, todo = set(), [name for name in graph if name == plugin or name.startswith(plugin + ".")]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    assert not {module for module in reached if module.startswith(f"{PACKAGE}.pipelines")}


def test_no_public_class_name_is_defined_twice():
    """One name per class: a public class name is defined by one module (aliases to it are fine)."""
    defined = defaultdict(list)
    for name, (path, _) in package_modules().items():
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                defined[node.name].append(name)
    assert {name: modules for name, modules in defined.items() if len(modules) > 1} == {}


def _run_and_print(code: str) -> str:
    """``code`` run by a fresh interpreter (it must succeed); what it printed, stripped."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_the_vllm_omni_entry_point_module_imports_light():
    """vllm-omni imports ``qwen_image_omni.integrations.vllm_omni`` in every process: it loads neither
    vllm nor the RL stack until ``register()`` runs, and ``register`` is there."""
    code = (
        "import sys\n"
        "import qwen_image_omni.integrations.vllm_omni as plugin\n"
        "assert callable(plugin.register)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'vllm_omni')"
        " or m.startswith('qwen_image_omni.pipelines')))\n"
    )
    assert _run_and_print(code) == "[]"


def test_the_test_tree_mirrors_the_package_with_few_files_at_its_root():
    tests = Path(__file__).resolve().parent
    assert len(list(tests.glob("test_*.py"))) <= 8
    for folder in ("models", "kernels", "pipelines", "integrations/vllm_omni", "integrations/verl_omni", "cli", "check"):
        assert list((tests / folder).glob("test_*.py")), folder


def test_benchmarks_import_nothing_from_the_tests_and_load_no_script_by_path():
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    scripts = sorted(benchmarks.glob("*.py"))
    assert scripts
    for script in scripts:
        tree = ast.parse(script.read_text(), str(script))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] != "tests", f"{script.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] != "tests" for alias in node.names), script.name
            elif isinstance(node, ast.Attribute):
                assert node.attr != "spec_from_file_location", f"{script.name} loads a script by path"


def test_the_kernels_import_and_run_without_diffusers():
    """``qwen_image_omni.kernels`` needs torch only (a GPU image may lack diffusers): the package's
    top-level names are lazy, and no kernel module imports diffusers."""
    code = (
        "import importlib.abc, sys\n"
        "class NoDiffusers(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'diffusers':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoDiffusers())\n"
        "import torch\n"
        "from qwen_image_omni.kernels import joint_qk_norm_rope\n"
        "b, s_img, s_txt, h, d = 1, 3, 2, 2, 8\n"
        "img_q, img_k = torch.randn(2, b, s_img, h, d)\n"
        "txt_q, txt_k = torch.randn(2, b, s_txt, h, d)\n"
        "weights = dict.fromkeys(['img_q_weight', 'img_k_weight', 'txt_q_weight', 'txt_k_weight'], torch.ones(d))\n"
        "img_freqs = torch.polar(torch.ones(s_img, d // 2), torch.randn(s_img, d // 2))\n"
        "txt_freqs = torch.polar(torch.ones(s_txt, d // 2), torch.randn(s_txt, d // 2))\n"
        "q, k = joint_qk_norm_rope(img_q, img_k, txt_q, txt_k, **weights, img_freqs=img_freqs,"
        " txt_freqs=txt_freqs, backend='torch')\n"
        "assert q.shape == k.shape == (b, s_txt + s_img, h, d), (q.shape, k.shape)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))\n"
    )
    assert _run_and_print(code) == "[]"


def test_the_top_level_names_are_lazy_but_listed():
    """``from qwen_image_omni import QwenImageTransformer2DModel`` and ``dir()`` still see the model."""
    assert set(qwen_image_omni.__all__) <= set(dir(qwen_image_omni))
    from qwen_image_omni import QwenImageTransformer2DModel
    from qwen_image_omni.models import QwenImageTransformer2DModel as defined

    assert QwenImageTransformer2DModel is defined
