"""The prepared GPU check (benchmarks/gpu_check.py), in the parts that run without a GPU: argument
handling, the step runner's failure / timeout / budget handling, the JUnit reader, the JSON and
Markdown report, the no-GPU exit, and one end-to-end run of the steps on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
PY = sys.executable


def load():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc = load()


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "names"), [
    (["--steps", "env,bogus"], "--steps='env,bogus': bogus not among"),
    (["--budget", "0"], "--budget must be > 0"),
    (["--train-budget", "-5"], "--train-budget must be > 0"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--train-precisions", "fp8"], "--train-precisions='fp8': fp8 not among"),
    (["--train-modes", ""], "--train-modes='': empty not among"),
    (["--kernel-ops", "proto_contrast,nope"], "--kernel-ops='proto_contrast,nope': nope"),
    (["--python", "/no/such/python3"], "--python '/no/such/python3': no such interpreter"),
    (["--budget", "abc"], "argument --budget: invalid float value: 'abc'"),
])
def test_bad_arguments_are_one_error_line(argv: list[str], names: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        gc.parse_args(["--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: gpu_check: "), err
    assert names in err


def test_out_must_be_a_writable_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(SystemExit):
        gc.parse_args(["--out", str(afile)])
    assert f"--out {afile}: exists and is not a directory" in capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SystemExit):
            gc.parse_args(["--out", str(locked / "a" / "b")])
        assert "is not writable" in capsys.readouterr().err
    args = gc.parse_args(["--out", str(tmp_path / "new" / "dir")])  # created later, not now
    assert not (tmp_path / "new").exists() and args.steps == list(gc.STEP_NAMES)


def test_out_defaults_to_the_OUT_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gc.parse_args([]).out == str(tmp_path)


def test_plan_builds_against_the_torch_there_with_all_cores(tmp_path: Path) -> None:
    args = gc.parse_args(["--out", str(tmp_path), "--python", PY, "--jobs", "16",
                          "--train-precisions", "bf16,fp32"])
    steps = gc.plan(args, "cuda", tmp_path)
    names = [s.name for s in steps]
    assert names == ["env", "build", "build-check", "tests", "kernels", "data",
                     "train daformer bf16 auto", "train daformer bf16 published",
                     "train daformer fp32 auto", "train daformer fp32 published",
                     "train daformer bf16 torch", "train daformer fp32 torch"]
    build = steps[1]
    assert build.cmd == [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                         "--no-index", "-e", "."]
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build.env["MAX_JOBS"] == "16"
    assert build.env["FASTUDA_CUDA"] == "1"
    tests = steps[3].cmd
    assert tests[:6] == [PY, "-m", "pytest", "-q", "-m", "cuda"]
    assert "tests/ops/test_cuda_device.py" in tests and "tests/ops/test_triton_contrast.py" in tests
    assert "tests/test_config.py" not in tests
    kernels = steps[4].cmd
    assert kernels[1].endswith("kernel_bench.py") and kernels[2:5] == ["--device", "cuda",
                                                                       "--quick"]
    assert "--no-memory" not in kernels  # the CUDA peak memory is measured in-process
    train = steps[6].cmd
    assert train[train.index("--settings") + 1] == "daformer"
    assert train[train.index("--precisions") + 1] == "bf16"
    # on the CPU the FASTUDA_CUDA requirement is not imposed
    assert "FASTUDA_CUDA" not in gc.plan(args, "cpu", tmp_path)[1].env


def test_child_env_drops_a_ccache_nvcc_where_there_is_no_ccache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_NVCC", "ccache nvcc")
    monkeypatch.setattr(gc.shutil, "which", lambda name: None)
    env = gc.child_env()
    assert "PYTORCH_NVCC" not in env and env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


# ----------------------------------------------------------------------------------------------
# The step runner
# ----------------------------------------------------------------------------------------------
FAILING = """
import sys
print("step output before the error")
def inner():
    raise ValueError("boom: shape [2, 3]")
inner()
"""


def test_a_failing_step_is_recorded_with_its_traceback_tail() -> None:
    step = gc.Step("fails", [PY, "-c", FAILING], 30)
    record = gc.run_step(step, 30, dict(os.environ))
    assert record["status"] == "failed" and record["returncode"] == 1
    assert record["error"].startswith("Traceback (most recent call last):")
    assert record["error"].splitlines()[-1] == "ValueError: boom: shape [2, 3]"
    assert "line 5, in inner" in record["error"]
    assert "step output before the error" in record["tail"]


def test_a_step_that_cannot_start_is_a_failure() -> None:
    status, rc, _s, output = gc.run_command(["/no/such/binary"], 10)
    assert status == "failed" and rc is None and "could not start /no/such/binary" in output


def test_an_ok_step_whose_output_cannot_be_read_is_a_failure(tmp_path: Path) -> None:
    step = gc.Step("no json", [PY, "-c", "print('hi')"], 30,
                   parse=lambda _out: gc.read_json(tmp_path / "never.json"))
    record = gc.run_step(step, 30, dict(os.environ))
    assert record["status"] == "failed"
    assert record["error"] == "its output could not be read: FileNotFoundError: never.json was " \
                              "not written"


HANGS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
print("started child", flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_hanging_step_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    record = gc.run_step(gc.Step("hangs", [PY, "-c", HANGS, str(pid_file)], 3), 3,
                         dict(os.environ))
    assert time.monotonic() - t0 < 20
    assert record["status"] == "timeout" and record["returncode"] is None
    assert record["error"].startswith("killed after 3 s (its limit)")
    assert "started child" in record["tail"]
    child = int(pid_file.read_text())
    for _ in range(50):  # the group's SIGTERM has reached the grandchild too
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)


def test_the_budget_shortens_and_skips_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc, "RESERVE_S", 1.0)
    steps = [gc.Step("quick", [PY, "-c", "print('done')"], 60, 0.5),
             gc.Step("long", [PY, "-c", "import time; time.sleep(60)"], 60, 0.5),
             gc.Step("later", [PY, "-c", "print('never')"], 60, 5)]
    seen: list[str] = []
    t0 = time.monotonic()
    records = gc.run_steps(steps, 6.0, dict(os.environ), lambda r: seen.append(r["name"]))
    assert time.monotonic() - t0 < 6.0 + 10  # the kill's grace periods at most
    assert [r["status"] for r in records] == ["ok", "timeout", "skipped"]
    assert seen == ["quick", "long", "later"]
    assert records[1]["timeout_s"] <= 5.0  # its own 60 s cut to what the budget had left
    assert records[2]["error"].startswith("not started:") and "needs at least 5 s" in \
        records[2]["error"]


def test_error_tails() -> None:
    text = "compiling a.cu\nx.cu(3): error: identifier y is undefined\nninja: build stopped\n"
    assert gc.traceback_tail(text) == "x.cu(3): error: identifier y is undefined\n" \
                                      "ninja: build stopped"
    build = ("[1/9] nvcc a.cu\na.cu(7): error: no operator matches\n"
             + "".join(f"line {i}\n" for i in range(100))
             + "Traceback (most recent call last):\nRuntimeError: Error compiling objects\n")
    # a build's cause is the compiler's first error, not the traceback that follows it
    got = gc.first_error(build, 10).splitlines()
    assert got[0] == "a.cu(7): error: no operator matches" and len(got) == 10
    assert got[-2:] == ["...", "RuntimeError: Error compiling objects"]
    assert gc.traceback_tail(build) == "Traceback (most recent call last):\n" \
                                       "RuntimeError: Error compiling objects"
    assert gc.output_lines("bar 10%\rbar 50%\rbar 100%\nnext") == ["bar 100%", "next"]


# ----------------------------------------------------------------------------------------------
# Reading the steps' output; the report
# ----------------------------------------------------------------------------------------------
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5">
<testcase classname="tests.ops.test_cuda_device" name="test_a[1]" time="0.5"/>
<testcase classname="tests.ops.test_cuda_device" name="test_a[2]" time="2.5"/>
<testcase classname="tests.ops.test_cuda_device" name="test_b" time="1.0">
  <failure message="AssertionError: Tensor-likes are not close!">line 1
E   AssertionError: Tensor-likes are not close!</failure></testcase>
<testcase classname="tests.ops.test_triton_contrast" name="test_c" time="61.0">
  <error message="Failed: Timeout &gt;60.0s">timeout</error></testcase>
<testcase classname="tests.ops.test_labels" name="test_d" time="0.0">
  <skipped message="needs a CUDA GPU"/></testcase>
</testsuite></testsuites>
"""


def test_parse_junit(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    d = gc.parse_junit(path)
    assert (d["passed"], d["failed"], d["error"], d["skipped"], d["total"]) == (2, 1, 1, 1, 5)
    assert [f["test"] for f in d["failures"]] == ["tests.ops.test_cuda_device::test_b",
                                                  "tests.ops.test_triton_contrast::test_c"]
    assert d["failures"][1]["message"] == "Failed: Timeout >60.0s"
    assert d["slowest"][0] == {"test": "tests.ops.test_triton_contrast::test_c", "seconds": 61.0}


def _train_row(mode: str, precision: str, ms: float) -> dict:
    return {"setting": "daformer", "model": "daformer/mit_b5", "crop": 512, "batch_size": 2,
            "precision": precision, "mode": mode, "ms_per_step": ms, "ms_per_step_median": ms + 1,
            "method_ms": ms / 10, "peak_memory_mib": 20000.0, "embed_dim": 256}


def sample_report() -> dict:
    kernels = {"meta": {"ceilings": {"copy_gb_s": 4300.0, "matmul_gflop_s": 51000.0,
                                     "matmul_bf16_gflop_s": 790000.0}},
               "rows": [{"op": "proto_contrast", "scale": "daformer", "shape": [2, 256, 160, 160],
                         "impl": "cuda", "ms": 0.25, "speedup_vs_published": 12.0,
                         "speedup_vs_lean": 4.0, "extra_peak_mb": 50.0, "pct_of_copy": 60.5,
                         "pct_of_matmul": 3.0}],
               "auto": [{"op": "proto_contrast", "scale": "daformer", "auto": "cuda",
                         "auto_ms": 0.25, "fastest": "triton", "fastest_ms": 0.2,
                         "auto_over_fastest": 1.25}]}
    return {"schema": 1, "started": "2026-12-03T10:00:00+00:00", "finished": None,
            "device": "cuda", "budget_s": 470.0, "elapsed_s": 123.4,
            "environment": {"gpu": "NVIDIA H200", "torch": "2.11.0", "torch_cuda": "13.0"},
            "steps": [
                {"name": "build", "status": "ok", "seconds": 95.0, "timeout_s": 240.0,
                 "command": "python3 -m pip install -e ."},
                {"name": "tests", "status": "failed", "seconds": 50.0, "timeout_s": 150.0,
                 "command": "python3 -m pytest -m cuda",
                 "error": "Traceback (most recent call last):\nAssertionError: not close",
                 "data": {"passed": 120, "failed": 1, "error": 0, "skipped": 4, "total": 125,
                          "failures": [{"test": "t::test_b", "kind": "failure",
                                        "message": "AssertionError: not close", "tail": ""}],
                          "slowest": []}},
                {"name": "kernels", "status": "ok", "seconds": 40.0, "timeout_s": 120.0,
                 "command": "kernel_bench", "data": kernels},
                {"name": "train daformer bf16 auto", "status": "ok", "seconds": 30.0,
                 "command": "train_bench", "data": {"results": [_train_row("auto", "bf16",
                                                                           150.0)]}},
                {"name": "train daformer bf16 published", "status": "ok", "seconds": 30.0,
                 "command": "train_bench", "data": {"results": [_train_row("published", "bf16",
                                                                           300.0)]}},
                {"name": "train daformer fp32 auto", "status": "timeout", "seconds": 60.0,
                 "command": "train_bench fp32", "error": "killed after 60 s (its limit)"},
                {"name": "train daformer fp32 torch", "status": "skipped", "seconds": 0.0,
                 "command": "train_bench", "error": "not started: 3 s of the 470 s budget left"},
            ]}


def test_report_json_and_markdown(tmp_path: Path) -> None:
    report = sample_report()
    gc.write_report(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == report
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert md.startswith("# fastuda GPU check, 2026-12-03\n")
    assert "Device: NVIDIA H200; torch 2.11.0 (CUDA 13.0)" in md
    assert "123 s of the 470 s budget (still running or cut short)." in md
    assert "| build | ok | 95.0 | 240.0 |  |" in md
    assert "| train daformer fp32 torch | skipped | 0.0 | - | not started: 3 s of the 470 s " \
           "budget left |" in md
    assert "120 passed, 1 failed, 0 errors, 4 skipped of 125." in md
    assert "| t::test_b | failure | AssertionError: not close |" in md
    assert "copy 4300.0 GB/s, fp32 matmul 51000 GFLOP/s, bf16 matmul 790000 GFLOP/s" in md
    assert "| proto_contrast | daformer | 2,256,160,160 | cuda | 0.250 | 12.0 | 4.0 | 50.0 | " \
           "60.5 | 3.0 |" in md
    assert "| proto_contrast | daformer | cuda | 0.250 | triton | 0.200 | 1.25 |" in md
    # the fastuda bf16 step against the published bf16 step: 300 / 150
    assert "| daformer | daformer/mit_b5 | 512x512 | 2 | bf16 | auto | 150.0 | 151.0 | 15.0 | " \
           "20000.0 | 2.00x |" in md
    assert "| 2 | bf16 | published | 300.0 | 301.0 | 30.0 | 20000.0 | 1.00x |" in md
    failed = md.split("## What failed")[1]
    assert "### tests: failed" in failed and "### train daformer fp32 auto: timeout" in failed
    assert "AssertionError: not close" in failed and "skipped" not in failed


# ----------------------------------------------------------------------------------------------
# The script as a whole
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_one_line_and_exit_0(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([PY, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("gpu_check: no GPU here: ")
    assert not out.exists()
    bad = subprocess.run([PY, str(SCRIPT), "--steps", "nope"], capture_output=True, text=True,
                         timeout=300)  # the arguments are checked first
    assert bad.returncode == 2 and bad.stderr.startswith("error: gpu_check: --steps='nope'")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run; a GPU runs the real check")
def test_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    """Every step but the build (it would reinstall the shared environment) through the real
    runner on the CPU: pytest -m cuda (all skipped here), a one-op kernel benchmark, the data
    step and one demo training process; then a second run whose train step runs out of time."""
    from fastuda.data.synthetic import generate_synthetic

    data = tmp_path / "synthetic"
    generate_synthetic(data, counts={"source": {"train": 8}, "target": {"train": 8, "val": 2}},
                       workers=1)
    out = tmp_path / "out"
    common = [PY, str(SCRIPT), "--allow-cpu", "--kernel-ops", "downscale_labels",
              "--train-settings", "demo", "--train-precisions", "fp32", "--train-modes", "auto",
              "--train-warmup", "0", "--train-iters", "1", "--data-root", str(data)]
    proc = subprocess.run([*common, "--out", str(out), "--steps", "env,tests,kernels,data,train",
                           "--train-budget", "400", "--budget", "900"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["env", "build-check", "tests", "kernels", "data",
                           "train demo fp32 auto"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert report["environment"]["torch"] == torch.__version__ and report["finished"]
    assert steps["build-check"]["data"]["extension_available"] is True
    tests = steps["tests"]["data"]
    assert tests["total"] > 50 and tests["skipped"] == tests["total"]  # no GPU: all skip
    assert steps["data"]["data"]["generated"] is False  # the pair given was complete
    auto = steps["kernels"]["data"]["auto"]
    assert [(a["op"], a["auto"]) for a in auto] == [("downscale_labels", "cpu")]
    (row,) = steps["train demo fp32 auto"]["data"]["results"]
    assert row["mode"] == "auto" and row["precision"] == "fp32" and row["ms_per_step"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "| train demo fp32 auto | ok |" in md and "| downscale_labels | daformer | cpu |" in md
    log = (out / "gpu_check.log").read_text()
    assert "===== tests: ok" in log and "===== train demo fp32 auto: ok" in log

    out2 = tmp_path / "out2"
    proc = subprocess.run([*common, "--out", str(out2), "--steps", "train",
                           "--train-budget", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1  # a step ran out of time
    (step,) = json.loads((out2 / "gpu_check.json").read_text())["steps"]
    assert step["status"] == "timeout" and step["error"].startswith("killed after 2 s")
    assert "### train demo fp32 auto: timeout" in (out2 / "gpu_check.md").read_text()
