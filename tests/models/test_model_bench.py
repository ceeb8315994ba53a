"""The model benchmark's measuring step runs and reports sane numbers (tiny setting, CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "model_bench.py"


def test_run_setting_on_cpu() -> None:
    spec = importlib.util.spec_from_file_location("model_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    setting = {"name": "deeplabv2", "backbone": "resnet18", "size": 32, "precision": "bf16"}
    row = bench.run_setting(setting, device="cpu", batch_size=1, warmup=1, iters=1,
                            channels_last=True, compile_model=False)
    assert row["images_per_s"] > 0 and row["ms_per_step"] > 0
    assert row["peak_mem_mb"] >= 0 and row["params_m"] > 11
    assert {"name", "backbone", "size", "precision", "device"} <= set(row)
