"""The kernel benchmark: its minimum-work model matches hand counts, and a small run prints the
table with roofline columns and writes the JSON (CPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bench.py"


def load_bench():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("kernel_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_min_work_hand_counts() -> None:
    bench = load_bench()
    # DAFormer scale: N = 2 * 160 * 160 = 51200 pixels, D = 256, fp32 features, int64 labels
    n, d, c = 51200, 256, 19
    nbytes, flops = bench.min_work("proto_contrast", (2, 256, 160, 160))
    assert nbytes == 3 * 4 * n * d + 2 * 8 * n  # f read twice, grad written once, labels twice
    assert flops == 2 * 2 * n * c * d  # forward logits and feature gradient
    nbytes, flops = bench.min_work("class_stats_full", (2, 64, 160, 160))
    assert flops == 2 * n * 64 * 64
    nbytes, flops = bench.min_work("downscale_labels", (2, 256, 160, 160))
    assert nbytes == 17 * 8 * n and flops == 0


def test_small_run_writes_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "kb.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--no-memory",
                           "--ops", "downscale_labels", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "ceilings: copy" in proc.stdout and "%copy" in proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["ceilings"]["copy_gb_s"] > 0
    assert data["meta"]["ceilings"]["matmul_gflop_s"] > 0
    impls = {r["impl"]: r for r in data["rows"]}
    assert {"lean", "cpu"} <= set(impls)
    for row in impls.values():
        assert row["ms"] > 0 and row["achieved_gb_s"] > 0
        assert row["pct_of_copy"] > 0
    assert impls["cpu"]["speedup_vs_lean"] > 1  # one pass vs a [B, C + 1, H, W] one-hot


def test_fair_share_ratio_hand_counts() -> None:
    bench = load_bench()
    assert bench.fair_share_ratio(2, 2, 2) == 2.0  # 4 runnable on 2 cores: half of each
    assert bench.fair_share_ratio(2, 2, 0) == 1.0
    assert bench.fair_share_ratio(1, 2, 1) == 1.0  # a free core for the one thread
    assert abs(bench.fair_share_ratio(1, 2, 2) - 1.5) < 1e-12  # 3 on 2 cores: 2/3 of one
    assert abs(bench.fair_share_ratio(4, 8, 6) - 1.25) < 1e-12  # 10 on 8: 3.2 of 4 cores


def test_contend_run_reports_ratio_and_stops_its_processes(tmp_path: Path) -> None:
    out = tmp_path / "kb.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--no-memory", "--contend", "1",
                           "--ops", "downscale_labels", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "x quiet" in proc.stdout and "load average at start" in proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["contend"] == 1 and len(data["meta"]["loadavg_start"]) == 3
    cpu = next(r for r in data["rows"] if r["impl"] == "cpu")
    assert cpu["contended_ms"] > 0
    assert abs(cpu["contended_ratio"] - cpu["contended_ms"] / cpu["ms"]) < 1e-9
    lean = next(r for r in data["rows"] if r["impl"] == "lean")
    assert "contended_ms" not in lean  # only the fastuda backends are timed twice


def test_busy_processes_spin_and_are_stopped() -> None:
    bench = load_bench()
    with bench.Busy(2) as busy:
        procs = list(busy.procs)
        assert len(procs) == 2 and all(p.poll() is None for p in procs)  # running
    assert all(p.poll() is not None for p in procs)  # killed and reaped on exit
