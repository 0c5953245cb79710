"""One GPU check: the ``cuda``-marked tests and the GPU benchmark tables, then one summary table.

    make gpu-check                                     # .venv's python (set up as for make test)
    make gpu-check PY=python3 GPU_CHECK_ARGS="--out /tmp/gpu.md"   # that interpreter as it is, no install
    python benchmarks/gpu_check.py [--out PATH] [--steps cuda-tests qk-norm-rope transformer]
    python benchmarks/gpu_check.py --device cpu        # plumbing run: the same steps at tiny sizes

Steps, each a subprocess with its own timeout, cut to what is left of the check's time budget
(:data:`PLANS`); a failing or timed-out step is reported in the summary and the others still run:

* ``env``: python, torch, triton and diffusers versions and the device. Without a usable CUDA
  device (or with a package missing) the check stops here with one line saying so.
* ``cuda-tests``: ``pytest -m cuda`` on the test modules that hold ``cuda``-marked tests.
* ``qk-norm-rope``: ``benchmarks/bench_qk_norm_rope.py``'s full table, bf16: diffusers eager, our
  torch backend, ``torch.compile`` of diffusers' sequence, our Triton kernel; every pass it times
  (forward, forward+backward, ...); µs, GB/s and % of peak HBM.
* ``transformer``: ``benchmarks/bench_transformer.py``, diffusers' class and ours, eager and
  regionally compiled (``compile_repeated_blocks``: each block compiled, the rest eager), bf16,
  1024x1024 image (4096 image tokens) + 512 text tokens at Qwen-Image width, a few layers.

The summary table and the benchmark tables are printed and written as markdown to ``--out``; each
step's full output goes to a log folder beside it. The exit code is 0 only when every step passed.
``--device cpu`` runs the same code at tiny sizes (Triton interpreted) to check the plumbing: its
figures are not GPU figures and are labelled so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
TESTS = REPO / "tests"
STEPS = ("cuda-tests", "qk-norm-rope", "transformer")
# Per device: each step's timeout and the whole check's time budget in seconds, and the benchmarks'
# arguments. A step gets at most what is left of the budget, so on CUDA the check ends inside 8
# minutes even when steps run out of time; a step that finishes early leaves its time to the next.
PLANS = {
    "cuda": {
        "timeouts": {"cuda-tests": 150, "qk-norm-rope": 240, "transformer": 180},
        "budget": 450,
        "qk": ["--full-dtype", "bf16", "--full-txt", "512", "1024"],
        "transformer": ["--dtype", "bf16", "--layers", "8", "--image", "1024", "--txt", "512",
                        "--compile", "regional", "--warmup", "3", "--repeats", "20"],
    },
    "cpu": {
        "timeouts": {"cuda-tests": 300, "qk-norm-rope": 600, "transformer": 600},
        "budget": 1500,
        "qk": ["--full-dtype", "bf16", "--full-txt", "16", "--img", "64", "--heads", "2", "--head-dim", "32",
               "--repeats", "3", "--warmup", "1"],
        "transformer": ["--dtype", "bf16", "--layers", "1", "--heads", "2", "--image", "64", "--txt", "16",
                        "--compile", "regional", "--warmup", "1", "--repeats", "2"],
    },
}
CPU_LABEL = "CPU PLUMBING RUN at tiny sizes: these are NOT GPU figures"
# A full-table row from its implementation column on: name, µs, GB/s, % of peak (or "-").
QK_CELLS = re.compile(r"^(\S.*?)\s+(\d+(?:\.\d+)?)\s+(\d+(?:\.\d+)?)\s+(\d+|-)\s*$")
QK_OURS = "ours triton"
QK_LAYOUTS = ("", "per-sample ", "1-stream ")  # row-name prefixes of the layouts (joint, per-sample tables, 2.1)
QK_KEY_PASSES = ("fwd", "fwd+bwd")  # the passes the summary quotes; the markdown file has every row


@dataclasses.dataclass
class Step:
    """One subprocess of the check and how to read its figures."""

    name: str
    argv: list[str]
    timeout_s: float
    # (log folder, full output) -> (passed, key figures); called whatever the exit code.
    figures: Callable[[Path, str], tuple[bool, str]]
    env: dict[str, str]


@dataclasses.dataclass
class Result:
    """What one step gave: status is "ok", "FAIL" or "TIMEOUT"."""

    step: str
    status: str
    seconds: float
    figures: str


# ----------------------------------------------------------------------------- environment


def import_versions() -> tuple[dict[str, str], str | None]:
    """Versions of the packages the steps need, and a one-line error when one does not import."""
    sys.path.insert(0, str(REPO))
    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "diffusers", "qwen_image_omni"):
        try:
            module = __import__(name)
        except Exception as error:  # noqa: BLE001 - any import failure means the same thing here
            return versions, (
                f"gpu-check: cannot import {name} ({type(error).__name__}: {error}) in {sys.executable}: "
                f"install it there, or carry its wheel to this machine"
            )
        versions[name] = getattr(module, "__version__", str(Path(module.__file__).parent))
    return versions, None


def cuda_device(torch) -> tuple[str, str | None]:
    """The CUDA device's description, and a one-line error when none is visible or usable."""
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "no CUDA device", (
            f"gpu-check: no CUDA device visible (torch {torch.__version__}, {build}"
            f"{f', CUDA_VISIBLE_DEVICES={visible!r}' if visible is not None else ''}, {sys.executable}): "
            f"run it on a GPU machine with a CUDA build of torch, or pass --device cpu for a plumbing run"
        )
    try:
        torch.ones(1, device="cuda").add_(1).item()
    except Exception as error:  # noqa: BLE001
        return "unusable CUDA device", f"gpu-check: the CUDA device is visible but fails a first operation: {error}"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)", None


def environment(device: str) -> tuple[dict[str, str], str | None]:
    """Versions and device description (``device`` key), or a one-line error to stop on."""
    versions, error = import_versions()
    if error:
        return versions, error
    import torch

    versions["cuda"] = torch.version.cuda or "none"
    if device == "cpu":
        versions["device"] = "cpu (plumbing run)"
        return versions, None
    versions["device"], error = cuda_device(torch)
    return versions, error


def describe(versions: dict[str, str]) -> str:
    """One line: device and package versions."""
    def version(name: str) -> str:
        return versions.get(name, "not importable")

    return (
        f"{versions.get('device', 'device not checked')}; python {versions['python']}, torch {version('torch')} "
        f"(CUDA {version('cuda')}), triton {version('triton')}, diffusers {version('diffusers')}"
    )


# ----------------------------------------------------------------------------- figures of each step


def cuda_test_files() -> list[str]:
    """Test modules that hold ``cuda``-marked tests: only these are collected, so that a module that
    cannot import on the GPU machine's packages (and holds no GPU test) stops nothing."""
    modules = TESTS.rglob("test_*.py")
    return sorted(str(p.relative_to(REPO)) for p in modules if "mark.cuda" in p.read_text(encoding="utf-8"))


def junit_counts(path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped summed over a JUnit XML report's test suites."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {key: sum(int(suite.get(key, 0)) for suite in suites) for key in keys}


def pytest_figures(device: str) -> Callable[[Path, str], tuple[bool, str]]:
    """Reads pytest's JUnit report: on CUDA every selected test must run and pass."""

    def figures(log_dir: Path, output: str) -> tuple[bool, str]:
        report = log_dir / "cuda-tests.xml"
        if not report.exists():
            return False, "no JUnit report (pytest did not get to run tests)"
        counts = junit_counts(report)
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        text = f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
        clean = counts["failures"] == counts["errors"] == 0
        if device == "cpu":
            return clean, text + (" (no CUDA here: skips expected)" if counts["skipped"] else "")
        return clean and passed > 0 and counts["skipped"] == 0, text

    return figures


def qk_rows(output: str) -> list[dict]:
    """The rows of bench_qk_norm_rope.py's full table, parsed from its output.

    Columns are found from the header line ("S_txt  pass  implementation  µs ..."), so pass names
    with spaces and changed column widths still parse.
    """
    rows, columns = [], None
    for line in output.splitlines():
        if "pass" in line and "implementation" in line:
            columns = line.index("pass"), line.index("implementation")
            continue
        if columns is None:
            continue
        txt, pass_ = line[: columns[0]].strip(), line[columns[0] : columns[1]].strip()
        match = QK_CELLS.match(line[columns[1] :])
        if match and txt.isdigit() and pass_:
            name, us, gbps, share = match.groups()
            rows.append({"txt": int(txt), "pass": pass_, "implementation": name, "us": float(us),
                         "gbps": float(gbps), "peak": share})
    return rows


def _layout(name: str) -> str:
    """The layout prefix of a row name (the longest of :data:`QK_LAYOUTS` it starts with)."""
    return max((p for p in QK_LAYOUTS if name.startswith(p)), key=len)


def qk_pass_figures(rows: list[dict], txt: int, pass_: str, layout: str = "") -> str | None:
    """Our Triton kernel's µs, GB/s and % of peak at one width, pass and layout, and how many times faster
    it is than the layout's other rows."""
    here = {r["implementation"]: r for r in rows
            if r["txt"] == txt and r["pass"] == pass_ and _layout(r["implementation"]) == layout}
    ours = here.get(layout + QK_OURS)
    if ours is None:
        return None
    peak = f"{ours['peak']} % of peak" if ours["peak"] != "-" else "peak unknown"
    faster = ", ".join(f"{name} {r['us'] / ours['us']:.2f}x" for name, r in here.items()
                       if name != layout + QK_OURS)
    label = f"{layout.strip() or 'joint'} S_txt {txt} {pass_}"
    return f"{label}: {ours['us']:.1f} µs, {ours['gbps']:.0f} GB/s, {peak}; speed-up vs {faster}"


def qk_figures(log_dir: Path, output: str) -> tuple[bool, str]:
    """Key figures of the fused op: our Triton kernel at the widest text, in each of :data:`QK_KEY_PASSES`,
    for each layout of :data:`QK_LAYOUTS`."""
    rows = qk_rows(output)
    if not rows:
        return False, "no rows of the full table found in the output"
    widest = max(r["txt"] for r in rows)
    found = [qk_pass_figures(rows, widest, pass_, layout) for layout in QK_LAYOUTS for pass_ in QK_KEY_PASSES]
    if None in found:
        return False, f"no '{QK_OURS}' row for S_txt {widest} in each of {QK_KEY_PASSES} and layouts in the output"
    return True, "; ".join(found)


def transformer_figures(log_dir: Path, output: str) -> tuple[bool, str]:
    """Key figures of the transformer forward, read from the JSON bench_transformer.py writes."""
    path = log_dir / "transformer.json"
    if not path.exists():
        return False, "no transformer.json written"
    modes = json.loads(path.read_text(encoding="utf-8"))["modes"]
    parts = []
    for mode, row in modes.items():
        part = (f"{mode}: diffusers {row['diffusers_median_ms']:.1f} ms, ours {row['ours_median_ms']:.1f} ms "
                f"({row['diffusers_over_ours']:.2f}x), "
                f"max diff ours vs diffusers {row['max_diff_ours_vs_diffusers']:.1e}")
        if mode != "eager":
            part += (f"; compiled speed-up over eager: diffusers {row['diffusers_eager_over_this']:.2f}x, "
                     f"ours {row['ours_eager_over_this']:.2f}x")
        parts.append(part)
    return len(modes) > 1, "; ".join(parts)


# ----------------------------------------------------------------------------- running steps


def plan(device: str, log_dir: Path, timeout_scale: float) -> list[Step]:
    """The steps of the check: the same commands on every device, sized by :data:`PLANS`."""
    sizes = PLANS[device]
    timeouts = {name: seconds * timeout_scale for name, seconds in sizes["timeouts"].items()}
    python = sys.executable
    # Triton runs on CPU tensors only in its interpreter; on CUDA nothing is forced.
    triton_env = {"TRITON_INTERPRET": "1"} if device == "cpu" else {}
    return [
        Step("cuda-tests", [python, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
                            f"--junitxml={log_dir / 'cuda-tests.xml'}", *cuda_test_files()],
             timeouts["cuda-tests"], pytest_figures(device), {}),
        Step("qk-norm-rope", [python, str(BENCHMARKS / "bench_qk_norm_rope.py"), "--no-cpu", "--full", *sizes["qk"]],
             timeouts["qk-norm-rope"], qk_figures, triton_env),
        Step("transformer", [python, str(BENCHMARKS / "bench_transformer.py"), "--device", device,
                             *sizes["transformer"], "--json", str(log_dir / "transformer.json")],
             timeouts["transformer"], transformer_figures, {}),
    ]


def subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH (nothing needs installing), and
    unbuffered UTF-8 output (the pipe is read as UTF-8)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    return env


def copy_lines(source, sink, log) -> None:
    """Echo a child's output line by line to the terminal and its log."""
    for line in source:
        sink.write(line)
        sink.flush()
        log.write(line)


def run_logged(step: Step, log: Path) -> tuple[int | None, float]:
    """Run the step's command, teeing its output to ``log``; exit code (None on timeout) and seconds."""
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as log_file:
        # Its own process group, so that a timeout also ends compile workers it started.
        process = subprocess.Popen(step.argv, cwd=REPO, env=subprocess_env(step.env), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                                   start_new_session=True)
        reader = threading.Thread(target=copy_lines, args=(process.stdout, sys.stdout, log_file), daemon=True)
        reader.start()
        try:
            rc = process.wait(timeout=step.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc = None
        reader.join(timeout=10)
    return rc, time.monotonic() - start


def last_line(text: str) -> str:
    """The last non-empty line of some output (usually the exception), shortened for a table cell."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:160] if lines else "no output"


def run_step(step: Step, log_dir: Path) -> Result:
    """Run one step and read its figures; a crash or timeout becomes a FAIL/TIMEOUT result, never an exception."""
    for stale in log_dir.glob(f"{step.name}.*"):  # a report left by an earlier run must not be read as this one's
        stale.unlink()
    log = log_dir / f"{step.name}.log"
    print(f"\n=== {step.name} (timeout {step.timeout_s:.0f} s): {shlex.join(step.argv)}", flush=True)
    rc, seconds = run_logged(step, log)
    output = log.read_text(encoding="utf-8")
    try:
        passed, figures = step.figures(log_dir, output)
    except Exception as error:  # noqa: BLE001 - a broken report is a failed step, not a crashed check
        passed, figures = False, f"figures unreadable: {type(error).__name__}: {error}"
    if rc is None:
        return Result(step.name, "TIMEOUT", seconds, f"killed after {step.timeout_s:.0f} s; {figures}")
    if rc != 0:
        return Result(step.name, "FAIL", seconds, f"exit {rc}: {last_line(output)}; {figures}")
    return Result(step.name, "ok" if passed else "FAIL", seconds, figures)


def run_within(step: Step, log_dir: Path, deadline: float) -> Result:
    """Run the step with its timeout cut to what is left before ``deadline`` (time.monotonic)."""
    left = deadline - time.monotonic()
    if left <= 0:
        return Result(step.name, "FAIL", 0.0, "not run: the check's time budget was spent by the steps before")
    return run_step(dataclasses.replace(step, timeout_s=min(step.timeout_s, left)), log_dir)


# ----------------------------------------------------------------------------- the report


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; '|' inside cells is escaped."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells[1:]])


def summary_table(results: list[Result]) -> str:
    """The one summary table: step, status, seconds, key figures."""
    rows = [[r.step, r.status, f"{r.seconds:.0f} s", r.figures] for r in results]
    return markdown_table(["step", "status", "time", "key figures"], rows)


def qk_section(log_dir: Path) -> str:
    """bench_qk_norm_rope.py's full table as markdown, with its header line."""
    log = log_dir / "qk-norm-rope.log"
    output = log.read_text(encoding="utf-8") if log.exists() else ""
    rows = qk_rows(output)
    if not rows:
        return ""
    heading = next((line.strip() for line in output.splitlines() if "peak HBM" in line), "")
    table = markdown_table(["S_txt", "pass", "implementation", "µs", "GB/s", "% of peak"],
                           [[r["txt"], r["pass"], r["implementation"], f"{r['us']:.1f}", f"{r['gbps']:.0f}", r["peak"]]
                            for r in rows])
    return f"## q/k RMSNorm + RoPE + concat (benchmarks/bench_qk_norm_rope.py)\n\n{heading}\n\n{table}\n"


def transformer_section(log_dir: Path) -> str:
    """bench_transformer.py's figures as a markdown table, with the shape it ran."""
    path = log_dir / "transformer.json"
    if not path.exists():
        return ""
    record = json.loads(path.read_text(encoding="utf-8"))
    heading = (f"{record['machine']}, {record['dtype']}, {record['layers']} layers of {record['heads']} x "
               f"{record['head_dim']}, {record['image_tokens']} image + {record['text_tokens']} text tokens, batch 1, "
               f"median of {record['repeats']} after {record['warmup']} warm-up; compiled = {record['compile']}")
    rows = [[mode, f"{r['diffusers_median_ms']:.2f}", f"{r['ours_median_ms']:.2f}", f"{r['diffusers_over_ours']:.2f}x",
             f"{r['diffusers_eager_over_this']:.2f}x", f"{r['ours_eager_over_this']:.2f}x",
             f"{r['max_diff_ours_vs_diffusers']:.1e}", f"{r['diffusers_max_diff_vs_eager_diffusers']:.1e}",
             f"{r['ours_max_diff_vs_eager_diffusers']:.1e}"] for mode, r in record["modes"].items()]
    header = ["mode", "diffusers ms", "ours ms", "diffusers/ours", "diffusers eager/this", "ours eager/this",
              "max diff ours vs diffusers", "max diff diffusers vs eager diffusers", "max diff ours vs eager diffusers"]
    table = markdown_table(header, rows)
    return f"## Transformer forward (benchmarks/bench_transformer.py)\n\n{heading}\n\n{table}\n"


def report(device: str, versions: dict[str, str], results: list[Result], log_dir: Path) -> str:
    """The markdown file: what ran where, the summary table, then the benchmark tables."""
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    label = f"**{CPU_LABEL}.**\n\n" if device == "cpu" else ""
    sections = [s for s in (qk_section(log_dir), transformer_section(log_dir)) if s]
    return (f"# gpu-check results\n\n{label}{when}: {describe(versions)}. Logs: {log_dir}\n\n"
            f"{summary_table(results)}\n\n" + "\n".join(sections))


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=list(PLANS), default="cuda",
                        help="cuda (default), or cpu for a plumbing run at tiny sizes (not GPU figures)")
    parser.add_argument("--out", type=Path, help="markdown results file (default benchmarks/gpu_check_results.md, "
                                                 "benchmarks/gpu_check_cpu_plumbing.md for --device cpu)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run (default all)")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every step's timeout and the check's time budget (default 1)")
    args = parser.parse_args(argv)
    default_name = "gpu_check_results.md" if args.device == "cuda" else "gpu_check_cpu_plumbing.md"
    args.out = (args.out or BENCHMARKS / default_name).resolve()
    if args.timeout_scale <= 0:
        parser.error(f"--timeout-scale must be > 0, got {args.timeout_scale}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Check the environment, run the steps, print and write the summary; 0 when every step passed."""
    args = parse_args(argv)
    # The tables print "µs": a terminal without UTF-8 must not stop the echo of a step's output.
    sys.stdout.reconfigure(errors="replace")
    start = time.monotonic()
    versions, error = environment(args.device)
    print(f"gpu-check: {describe(versions)}", flush=True)
    if error:
        print(error, file=sys.stderr)
        return 2
    if args.device == "cpu":
        print(f"gpu-check: {CPU_LABEL}", flush=True)
    log_dir = args.out.with_name(f"{args.out.stem}_logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    results = [Result("env", "ok", time.monotonic() - start, describe(versions))]
    deadline = start + PLANS[args.device]["budget"] * args.timeout_scale
    for step in plan(args.device, log_dir, args.timeout_scale):
        if step.name in args.steps:
            results.append(run_within(step, log_dir, deadline))

    args.out.write_text(report(args.device, versions, results, log_dir), encoding="utf-8")
    label = f" ({CPU_LABEL})" if args.device == "cpu" else ""
    print(f"\n=== gpu-check summary{label}, {time.monotonic() - start:.0f} s in all\n")
    print(summary_table(results))
    print(f"\nwritten to {args.out} (step logs in {log_dir})")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
