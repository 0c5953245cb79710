"""The ``qwen-image-omni`` front end: argument errors, ``check --vllm-omni`` and ``bench``."""

from __future__ import annotations

import pytest
import torch

from qwen_image_omni import cli


def test_check_vllm_omni_without_vllm_omni_says_so_and_passes(capsys, monkeypatch):
    """The vllm-omni report on a machine without vllm-omni (the plugin report itself: tests/integrations/vllm_omni/test_check.py)."""
    from qwen_image_omni.integrations.vllm_omni import check as vllm_omni_check

    monkeypatch.setattr(vllm_omni_check, "installed_version", lambda distribution: None)
    assert cli.main(["check", "--vllm-omni"]) == 0
    assert capsys.readouterr().out.startswith("vllm-omni: not installed")


@pytest.mark.parametrize(
    ("version", "supported"),
    [("0.27.0rc1", True), ("0.30.0", True), ("0.32.0rc1", True), ("0.26.0", False), ("0.32.0", False)],
)
def test_check_vllm_omni_says_whether_the_version_is_in_the_tested_range(version, supported):
    from qwen_image_omni.integrations.vllm_omni.check import support_note

    assert support_note(version).startswith("supported" if supported else "untested")


def test_check_rejects_bad_model_and_device(tmp_path, capsys):
    assert cli.main(["check", "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("qwen-image-omni check: error: --model: expected a diffusers checkpoint")
    assert cli.main(["check", "--device", "banana"]) == 2
    assert capsys.readouterr().err == (
        "qwen-image-omni check: error: --device: expected a torch device such as cpu or cuda:0, got 'banana'\n"
    )


def test_device_ordinal_past_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.parse_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"^--device: 'cuda:2' requested but only 2 CUDA device\(s\) are visible$"):
        cli.parse_device("cuda:2")




# ----------------------------------------------------------------------------- bench


def test_bench_runs_the_benchmark_script_of_this_checkout_in_its_own_process(capfd):
    assert cli.main(["bench", "transformer", "--help"]) == 0
    assert "usage: bench_transformer.py" in capfd.readouterr().out


def test_bench_says_where_the_scripts_are_when_they_are_not_installed(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path)
    assert cli.main(["bench", "transformer"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "not installed with the package: in a clone, run `make bench` or `python benchmarks/bench_transformer.py`" in err


def test_bench_passes_its_arguments_to_the_script_and_returns_its_status(monkeypatch, tmp_path, capfd):
    (tmp_path / "bench_transformer.py").write_text("import sys\nprint('argv', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path)
    assert cli.main(["bench", "transformer", "--layers", "1"]) == 3
    assert "argv ['--layers', '1']" in capfd.readouterr().out


def test_bench_all_takes_no_arguments(capsys):
    assert cli.main(["bench", "all", "--layers", "1"]) == 2
    assert "arguments go to one benchmark" in capsys.readouterr().err
