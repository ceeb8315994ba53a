"""The prepared GPU check: everything fastuda's GPU path needs shown, in one run of a few minutes.

    python3 benchmarks/gpu_check.py [--out DIR] [--budget 470]
                                    [--steps env,build,tests,kernels,data,train] [--allow-cpu]
    make gpu-check                  # the same, with --out $OUT (or bench_results/gpu_check)

Steps, in this order, each in its own process group with its own time limit, all inside one
overall budget (a step that would start with too little time left is skipped, one that runs past
its limit is killed; either way it is recorded and the next step runs):
  env      python, torch, CUDA, Triton, nvcc, the GPU (nvidia-smi), pytest and pytest-timeout
  build    ``pip install --no-build-isolation --no-deps --no-index -e .`` against the torch that
           is there (TORCH_CUDA_ARCH_LIST, MAX_JOBS = all cores, FASTUDA_CUDA=1), then a fresh
           process reports whether fastuda._C carries the CUDA kernels
  tests    ``pytest -m cuda`` over the test files that carry the marker (per-test limit through
           pytest-timeout where it is installed; the step's own limit always holds)
  kernels  ``benchmarks/kernel_bench.py --device cuda --quick``: every backend vs the published and
           lean formulations, the device's copy bandwidth and fp32/bf16 matmul rates, and the
           backend "auto" resolves to next to the fastest one measured
  data     the synthetic pair train_bench reads, generated once with all cores (not timed
           inside a train step)
  train    ``benchmarks/train_bench.py``: SePiCo DistCL steps (DAFormer/MiT-B5, 512x512, batch 2
           on CUDA), one process per (precision, formulation), most informative first

Everything measured lands in DIR/gpu_check.json and DIR/gpu_check.md (rewritten after every
step, so a run cut short still leaves what it had), each step's full output in DIR/gpu_check.log.
Exit status: 0 when every step that ran was ok, 1 when one failed or ran out of time, 2 for bad
arguments. Without a visible CUDA GPU the script checks its arguments, says so in one line and
exits 0 (``--allow-cpu`` runs the steps on the CPU instead: that is how the tests exercise it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
STEP_NAMES = ("env", "build", "tests", "kernels", "data", "train")
TRAIN_MODES = ("published", "torch", "auto")
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")
TRAIN_SETTINGS = ("demo", "deeplabv2", "daformer")
TAIL_LINES = 60  # of a step's output, kept in the JSON
ERROR_LINES = 40  # of a traceback, kept in the JSON
RESERVE_S = 5.0  # of the budget, kept back for writing the report


# ----------------------------------------------------------------------------------------------
# Running one step
# ----------------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    cmd: list[str]
    budget_s: float  # its own limit; the overall budget can shorten it
    min_s: float = 10.0  # not started with less time than this left
    env: dict[str, str] = field(default_factory=dict)
    parse: Callable[[str], dict[str, Any]] | None = None  # output text -> measured data
    # where a failure's cause shows: the last Python traceback (most steps), or the first
    # lines naming an error (a build: the compiler's message comes before the tracebacks)
    first_error: bool = False


def output_lines(text: str) -> list[str]:
    """Lines as a terminal shows them: a progress bar's carriage returns keep its last state."""
    return [line.rsplit("\r", 1)[-1] for line in text.rstrip().split("\n")]


def first_error(text: str, max_lines: int = ERROR_LINES) -> str:
    """From the first line naming an error on (at most ``max_lines``, then the output's last
    line), else the output's last lines."""
    lines = output_lines(text)
    start = next((i for i, line in enumerate(lines) if "error" in line.lower()), None)
    if start is None:
        return "\n".join(lines[-max_lines:])
    block = lines[start:]
    if len(block) > max_lines:
        block = [*block[:max_lines - 2], "...", lines[-1]]
    return "\n".join(block)


def traceback_tail(text: str, max_lines: int = ERROR_LINES) -> str:
    """The last Python traceback in ``text`` (at most ``max_lines`` of its end), else what
    ``first_error`` finds."""
    lines = output_lines(text)
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if starts:
        block = lines[starts[-1]:]
        # the traceback ends at its exception line: the first unindented line after the frames
        end = next((j for j in range(1, len(block)) if block[j] and not block[j][0].isspace()
                    and not block[j].startswith("Traceback")), len(block) - 1)
        return "\n".join(block[:end + 1][-max_lines:])
    return first_error(text, max_lines)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group (workers, compilers), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None,
                cwd: Path = ROOT) -> tuple[str, int | None, float, str]:
    """Runs ``cmd`` in a new process group; returns (status, returncode, seconds, output).

    status is "ok" (exit 0), "failed" (another exit code, or it could not start) or "timeout"
    (killed, with its children, after ``timeout_s``). stdout and stderr go to one temporary
    file, so a chatty step cannot block on a full pipe."""
    start = time.monotonic()
    with tempfile.TemporaryFile(mode="w+b") as log:
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:
            return "failed", None, time.monotonic() - start, f"could not start {cmd[0]}: {err}"
        try:
            rc: int | None = proc.wait(timeout=max(timeout_s, 0.01))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, "timeout"
        except BaseException:  # interrupted (SIGTERM to us): leave no step running
            _kill_group(proc)
            raise
        log.seek(0)
        output = log.read().decode("utf-8", errors="replace")
    return status, rc, time.monotonic() - start, output


def run_step(step: Step, timeout_s: float, env: dict[str, str]) -> dict[str, Any]:
    """One step's record: status, time, exit code, output tail, error tail, parsed data."""
    status, rc, seconds, output = run_command(step.cmd, timeout_s, {**env, **step.env})
    record: dict[str, Any] = {"name": step.name, "status": status, "seconds": round(seconds, 2),
                              "timeout_s": round(timeout_s, 1), "returncode": rc,
                              "command": " ".join(step.cmd),
                              "tail": "\n".join(output_lines(output)[-TAIL_LINES:])}
    if status == "timeout":
        record["error"] = (f"killed after {timeout_s:.0f} s (its limit)\n"
                           + traceback_tail(output, 15))
    elif status == "failed":
        record["error"] = first_error(output) if step.first_error else traceback_tail(output)
    if step.parse is not None:
        try:  # a timed-out or failed step may still have written part of its data
            record["data"] = step.parse(output)
        except Exception as err:  # noqa: BLE001  (any parse failure is part of the record)
            if status == "ok":
                record["status"] = "failed"
                record["error"] = f"its output could not be read: {type(err).__name__}: {err}"
    record["_output"] = output
    return record


def run_steps(steps: list[Step], budget_s: float, env: dict[str, str],
              on_record: Callable[[dict[str, Any]], None] = lambda r: None,
              clock: Callable[[], float] = time.monotonic) -> list[dict[str, Any]]:
    """Runs the steps in order inside ``budget_s`` seconds. Each gets the smaller of its own
    budget and what is left; one that would get less than its ``min_s`` is skipped."""
    deadline = clock() + budget_s
    records = []
    for step in steps:
        left = deadline - clock() - RESERVE_S
        if left < step.min_s:
            record: dict[str, Any] = {
                "name": step.name, "status": "skipped", "seconds": 0.0,
                "command": " ".join(step.cmd),
                "error": f"not started: {max(left, 0):.0f} s of the {budget_s:.0f} s budget left, "
                         f"it needs at least {step.min_s:.0f} s"}
        else:
            print(f"gpu_check: {step.name} (limit {min(step.budget_s, left):.0f} s) ...",
                  flush=True)
            record = run_step(step, min(step.budget_s, left), env)
            print(f"gpu_check: {step.name}: {record['status']} in {record['seconds']:.1f} s",
                  flush=True)
        records.append(record)
        on_record(record)
    return records


# ----------------------------------------------------------------------------------------------
# Reading what the steps wrote
# ----------------------------------------------------------------------------------------------
def parse_probe(output: str) -> dict[str, Any]:
    """The JSON line a probe printed (``PROBE {...}``)."""
    lines = [x for x in output.splitlines() if x.startswith("PROBE ")]
    if not lines:
        raise ValueError("no PROBE line in the output")
    return json.loads(lines[-1][len("PROBE "):])


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and failures from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures, slowest = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        seconds = float(case.get("time", 0) or 0)
        slowest.append((seconds, name))
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        counts["failed" if kind == "failure" else kind] += 1
        if kind in ("failure", "error"):
            node = case.find(kind)
            text = (node.text or "") if node is not None else ""
            message = node.get("message", "") if node is not None else ""
            failures.append({"test": name, "kind": kind, "message": message[:500],
                             "tail": "\n".join(text.rstrip().splitlines()[-25:])})
    slowest.sort(reverse=True)
    return {**counts, "total": sum(counts.values()), "failures": failures,
            "slowest": [{"test": n, "seconds": round(s, 2)} for s, n in slowest[:5]]}


def read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path.name} was not written")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# The report: JSON and Markdown
# ----------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |"
            for row in rows]
    return out


def _step(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((s for s in report["steps"] if s["name"] == name), None)


def render_markdown(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    lines = [f"# fastuda GPU check, {report['started'][:10]}",
             "",
             f"Device: {env.get('gpu') or report['device']}; torch {env.get('torch', '?')} "
             f"(CUDA {env.get('torch_cuda', '?')}), Triton {env.get('triton', '?')}, "
             f"nvcc {env.get('nvcc', '?')}, Python {env.get('python', '?')}, "
             f"{env.get('cpu_count', '?')} CPU cores. Started {report['started']}, "
             f"{report['elapsed_s']:.0f} s of the {report['budget_s']:.0f} s budget"
             + (" (finished)." if report.get("finished") else " (still running or cut short)."),
             "", "## Steps", ""]
    lines += _table(["step", "status", "seconds", "limit s", "note"],
                    [[s["name"], s["status"], s["seconds"], s.get("timeout_s"),
                      (s.get("error") or "").strip().splitlines()[-1:][0][:160].replace("|", "/")
                      if s.get("error") else ""] for s in report["steps"]])
    build = _step(report, "build")
    probe = _step(report, "build-check")
    if build or probe:
        lines += ["", "## Build", ""]
        if build:
            lines.append(f"`{build['command']}`: {build['status']} in {build['seconds']:.0f} s.")
        if probe and probe.get("data"):
            d = probe["data"]
            lines.append(f"fastuda._C: {d.get('extension') or 'not importable'}; CUDA kernels "
                         f"built: {d.get('cuda_kernels_built')}; Triton available: "
                         f"{d.get('triton_available')}.")
    tests = _step(report, "tests")
    if tests and tests.get("data"):
        d = tests["data"]
        lines += ["", "## Device tests (`pytest -m cuda`)", "",
                  f"{d['passed']} passed, {d['failed']} failed, {d['error']} errors, "
                  f"{d['skipped']} skipped of {d['total']}."]
        if d["failures"]:
            lines += [""] + _table(["test", "kind", "message"],
                                   [[f["test"], f["kind"],
                                     f["message"][:200].replace("|", "/").replace("\n", " ")]
                                    for f in d["failures"]])
    kernels = _step(report, "kernels")
    if kernels and kernels.get("data"):
        d = kernels["data"]
        c = d.get("meta", {}).get("ceilings", {})
        lines += ["", "## Kernels (`benchmarks/kernel_bench.py --quick`)", "",
                  f"Ceilings measured: copy {_fmt(c.get('copy_gb_s'))} GB/s, fp32 matmul "
                  f"{_fmt(c.get('matmul_gflop_s'), 0)} GFLOP/s, bf16 matmul "
                  f"{_fmt(c.get('matmul_bf16_gflop_s'), 0)} GFLOP/s.", ""]
        lines += _table(["op", "scale", "shape", "impl", "ms", "x published", "x lean",
                         "extra MiB", "% copy", "% fp32 mm"],
                        [[r["op"], r["scale"], ",".join(map(str, r["shape"])), r["impl"],
                          _fmt(r["ms"], 3), _fmt(r.get("speedup_vs_published")),
                          _fmt(r.get("speedup_vs_lean")), r.get("extra_peak_mb"),
                          r.get("pct_of_copy"), r.get("pct_of_matmul")]
                         for r in d.get("rows", []) if "impl" in r])
        if d.get("auto"):
            lines += ["", "Backend `auto` picks vs the fastest measured:", ""]
            lines += _table(["op", "scale", "auto picks", "auto ms", "fastest", "fastest ms",
                             "auto / fastest"],
                            [[a["op"], a["scale"], a["auto"], _fmt(a["auto_ms"], 3),
                              a["fastest"] or "-", _fmt(a["fastest_ms"], 3),
                              _fmt(a["auto_over_fastest"], 2)] for a in d["auto"]])
    train_rows = [r for s in report["steps"] if s["name"].startswith("train")
                  for r in (s.get("data") or {}).get("results", [])]
    if train_rows:
        lines += ["", "## Training steps (`benchmarks/train_bench.py`)", ""]
        rows = []
        for r in train_rows:
            base = next((x for x in train_rows if x["mode"] == "published"
                         and x["setting"] == r["setting"]
                         and x.get("precision") == r.get("precision")), None)
            rows.append([r["setting"], r["model"], f"{r['crop']}x{r['crop']}",
                         r["batch_size"], r.get("precision", "fp32"), r["mode"],
                         r["ms_per_step"], r["ms_per_step_median"], r["method_ms"],
                         r["peak_memory_mib"],
                         f"{base['ms_per_step'] / r['ms_per_step']:.2f}x" if base else "-"])
        lines += _table(["setting", "model", "crop", "batch", "precision", "formulation",
                         "ms/step (best)", "ms/step (median)", "method ms", "peak MiB",
                         "vs published"], rows)
    failed = [s for s in report["steps"] if s["status"] in ("failed", "timeout")]
    if failed:
        lines += ["", "## What failed", ""]
        for s in failed:
            lines += [f"### {s['name']}: {s['status']}", "", f"`{s['command']}`", "", "```",
                      (s.get("error") or "").rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """DIR/gpu_check.json and DIR/gpu_check.md, each replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(report, indent=1) + "\n"),
                       ("gpu_check.md", render_markdown(report))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)


# ----------------------------------------------------------------------------------------------
# Probes (run as steps, in fresh processes)
# ----------------------------------------------------------------------------------------------
def _run_quiet(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout or out.stderr).strip() or None


def probe_env() -> dict[str, Any]:
    import importlib.util
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    for mod in ("triton", "pytest", "setuptools", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001  (absent or broken: recorded as such)
            info[mod] = None
    info["pytest_timeout"] = importlib.util.find_spec("pytest_timeout") is not None
    nvcc = _run_quiet(["nvcc", "--version"])
    info["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    info["nvidia_smi"] = _run_quiet(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                     "clocks.sm,clocks.max.sm", "--format=csv,noheader"])
    info["ninja"] = bool(shutil.which("ninja") or importlib.util.find_spec("ninja"))
    info["ccache"] = shutil.which("ccache") is not None
    return info


def probe_data(root: str) -> dict[str, Any]:
    from fastuda.data.synthetic import generate_synthetic, synthetic_complete

    start = time.monotonic()
    had = synthetic_complete(Path(root))
    if not had:  # ensure_synthetic's generator, with every core rather than its default 4
        generate_synthetic(root, workers=os.cpu_count() or 1)
    return {"root": root, "generated": not had, "seconds": round(time.monotonic() - start, 1)}


def probe_build() -> dict[str, Any]:
    import fastuda.ops as ops
    from fastuda.ops import _backend

    info: dict[str, Any] = {"extension_available": ops.extension_available(),
                            "cuda_kernels_built": ops.cuda_kernels_built(),
                            "triton_available": _backend.triton_available(),
                            "extension_error": _backend._ext_error}
    if ops.extension_available():
        import fastuda._C
        info["extension"] = fastuda._C.__file__
    return info


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
def cuda_test_files(root: Path = ROOT) -> list[str]:
    """Test files that carry the ``cuda`` marker (relative to ``root``)."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py")
                  if "mark.cuda" in p.read_text(encoding="utf-8", errors="replace"))


def plan(args: argparse.Namespace, device: str, work: Path) -> list[Step]:
    py = args.python
    me = str(Path(__file__).resolve())
    steps: list[Step] = []
    if "env" in args.steps:
        steps.append(Step("env", [py, me, "--probe", "env"], 60, 5, parse=parse_probe))
    if "build" in args.steps:
        cuda_env = {"TORCH_CUDA_ARCH_LIST": args.arch, "MAX_JOBS": str(args.jobs),
                    "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        if device == "cuda":
            cuda_env["FASTUDA_CUDA"] = "1"  # a CUDA compile error fails the build, visibly
        steps.append(Step("build", [py, "-m", "pip", "install", "--no-build-isolation",
                                    "--no-deps", "--no-index", "-e", "."],
                          args.build_budget, 60, env=cuda_env, first_error=True))
    if "build" in args.steps or "tests" in args.steps:
        steps.append(Step("build-check", [py, me, "--probe", "build"], 60, 5,
                          parse=parse_probe))
    if "tests" in args.steps:
        junit = work / "junit.xml"
        cmd = [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfE",
               "--continue-on-collection-errors", f"--junitxml={junit}"]
        if args.pytest_timeout > 0 and _has_module(py, "pytest_timeout"):
            cmd.append(f"--timeout={args.pytest_timeout}")
        steps.append(Step("tests", cmd + cuda_test_files(), args.tests_budget, 30,
                          parse=lambda _out, j=junit: parse_junit(j)))
    if "kernels" in args.steps:
        kjson = work / "kernels.json"
        cmd = [py, str(ROOT / "benchmarks" / "kernel_bench.py"), "--device", device, "--quick",
               "--json", str(kjson), "--ops", args.kernel_ops]
        if device == "cpu":
            cmd.append("--no-memory")  # a fresh process per case: minutes on a CPU
        steps.append(Step("kernels", cmd, args.kernels_budget, 30,
                          parse=lambda _out, j=kjson: read_json(j)))
    if "data" in args.steps:
        steps.append(Step("data", [py, me, "--probe", "data", "--data-root", args.data_root],
                          args.data_budget, 10, parse=parse_probe))
    if "train" in args.steps:
        for setting, precision, mode in train_order(args.train_settings.split(","),
                                                    args.train_precisions.split(","),
                                                    args.train_modes.split(",")):
            tjson = work / f"train_{setting}_{precision}_{mode}.json"
            cmd = [py, str(ROOT / "benchmarks" / "train_bench.py"), "--device", device,
                   "--settings", setting, "--modes", mode, "--precisions", precision,
                   "--warmup", str(args.train_warmup), "--iters", str(args.train_iters),
                   "--data-root", args.data_root, "--out", str(tjson),
                   "--timeout", str(int(args.train_budget))]
            steps.append(Step(f"train {setting} {precision} {mode}", cmd, args.train_budget, 20,
                              parse=lambda _out, j=tjson: read_json(j)))
    return steps


def train_order(settings: list[str], precisions: list[str], modes: list[str]
                ) -> list[tuple[str, str, str]]:
    """The train processes, most informative first, so that the budget cuts the least useful:
    fastuda's kernels and the published formulation in every precision before the lean torch
    formulation (the in-between reference)."""
    return sorted(((s, p, m) for s in settings for p in precisions for m in modes),
                  key=lambda c: (c[2] == "torch", settings.index(c[0]), precisions.index(c[1]),
                                 modes.index(c[2])))


def _has_module(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    status, *_ = run_command([python, "-c", code], 30)
    return status == "ok"


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + traceback
        print(f"error: gpu_check: {message}", file=sys.stderr)
        sys.exit(2)


def _choices(value: str, allowed: tuple[str, ...], what: str, p: _Parser) -> str:
    items = [x for x in value.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        p.error(f"{what}={value!r}: {', '.join(bad) or 'empty'} not among {', '.join(allowed)}")
    return ",".join(items)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench_results"
                                                                 / "gpu_check"),
                   help="directory for gpu_check.json/.md/.log (default $OUT)")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for everything")
    p.add_argument("--steps", default=",".join(STEP_NAMES), help="comma-separated subset")
    p.add_argument("--python", default=sys.executable, help="interpreter for the steps")
    p.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST for the build")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="MAX_JOBS for the build")
    p.add_argument("--build-budget", type=float, default=240.0)
    p.add_argument("--tests-budget", type=float, default=150.0)
    p.add_argument("--pytest-timeout", type=int, default=60, help="seconds per test (0: none)")
    p.add_argument("--kernels-budget", type=float, default=120.0)
    p.add_argument("--kernel-ops", default=None, help="comma-separated (default: all)")
    p.add_argument("--data-budget", type=float, default=90.0)
    p.add_argument("--data-root", default=str(ROOT / "data" / "synthetic"),
                   help="the synthetic pair for train_bench (generated when incomplete)")
    p.add_argument("--train-budget", type=float, default=60.0, help="seconds per train process")
    p.add_argument("--train-settings", default="daformer")
    p.add_argument("--train-precisions", default="bf16,fp32")
    p.add_argument("--train-modes", default="auto,published,torch")
    p.add_argument("--train-warmup", type=int, default=1)
    p.add_argument("--train-iters", type=int, default=3)
    p.add_argument("--allow-cpu", action="store_true",
                   help="without a GPU run the steps on the CPU instead of exiting")
    p.add_argument("--probe", choices=["env", "build", "data"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        return args
    for name in ("budget", "build_budget", "tests_budget", "kernels_budget", "data_budget",
                 "train_budget"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(args, name)}")
    for name in ("jobs", "train_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_warmup < 0 or args.pytest_timeout < 0:
        p.error("--train-warmup and --pytest-timeout must be >= 0")
    args.steps = _choices(args.steps, STEP_NAMES, "--steps", p).split(",")
    args.train_settings = _choices(args.train_settings, TRAIN_SETTINGS, "--train-settings", p)
    args.train_precisions = _choices(args.train_precisions, TRAIN_PRECISIONS,
                                     "--train-precisions", p)
    args.train_modes = _choices(args.train_modes, TRAIN_MODES, "--train-modes", p)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kernel_bench import OPS  # the benchmark's own list: one name for one thing
    args.kernel_ops = _choices(args.kernel_ops or ",".join(OPS), OPS, "--kernel-ops", p)
    if shutil.which(args.python) is None and not Path(args.python).is_file():
        p.error(f"--python {args.python!r}: no such interpreter")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out}: exists and is not a directory")
    parent = next((q for q in (out, *out.parents) if q.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        p.error(f"--out {out}: {parent} is not writable")
    return args


def gpu_visible() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as err:
        return False, f"torch cannot be imported ({err})"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"
    return True, torch.cuda.get_device_name(0)


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if x))
    # the Makefile points nvcc at ccache when it is installed here; the GPU machine has none
    if env.get("PYTORCH_NVCC", "").startswith("ccache") and shutil.which("ccache") is None:
        del env["PYTORCH_NVCC"]
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        data = {"env": probe_env, "build": probe_build,
                "data": lambda: probe_data(args.data_root)}[args.probe]()
        print("PROBE " + json.dumps(data), flush=True)
        return 0
    visible, what = gpu_visible()
    if not visible and not args.allow_cpu:
        print(f"gpu_check: no GPU here: {what}; arguments checked, nothing run")
        return 0
    device = "cuda" if visible else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_check.log"
    log_path.write_text("")
    started = time.monotonic()
    report: dict[str, Any] = {
        "schema": 1, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "finished": None, "device": device, "budget_s": args.budget, "elapsed_s": 0.0,
        "argv": sys.argv if argv is None else argv, "environment": {}, "steps": []}

    def on_record(record: dict[str, Any]) -> None:
        output = record.pop("_output", "")
        with log_path.open("a") as log:
            log.write(f"===== {record['name']}: {record['status']} "
                      f"({record['seconds']:.1f} s) $ {record['command']}\n{output}\n")
        if record["name"] == "env" and record.get("data"):
            report["environment"] = record["data"]
        report["steps"].append(record)
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        write_report(report, out)

    def on_term(signum: int, _frame: object) -> NoReturn:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        try:
            run_steps(plan(args, device, Path(work)), args.budget, child_env(), on_record)
            report["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        except KeyboardInterrupt as err:
            report["interrupted"] = str(err) or "interrupted"
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        write_report(report, out)
    bad = [s["name"] for s in report["steps"] if s["status"] != "ok"]
    print(f"gpu_check: {len(report['steps']) - len(bad)} of {len(report['steps'])} steps ok"
          + (f"; not ok: {', '.join(bad)}" if bad else "")
          + f"; report in {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    failed = [s for s in report["steps"] if s["status"] in ("failed", "timeout")]
    return 1 if failed or report.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
