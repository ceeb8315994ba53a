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


def test_a_vit_row_per_size() -> None:
    spec = importlib.util.spec_from_file_location("model_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sizes = [s["backbone"] for s in bench.CPU_SETTINGS if s["name"] == "vit"]
    assert sizes == ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"]
    assert sizes == [s["backbone"] for s in bench.GPU_SETTINGS
                     if s["name"] == "vit" and s["precision"] == "bf16"]
    setting = {"name": "vit", "backbone": "dinov2_vits14", "size": 28, "precision": "fp32"}
    row = bench.run_setting(setting, device="cpu", batch_size=1, warmup=0, iters=1,
                            channels_last=False, compile_model=False)
    # ViT-S/14 (22.06 M) + the VFM-UDA head (ConvT 384->192->96, 3x3 conv, LayerNorms, 1x1)
    # + the projection (1x1 conv-BN 384->384->256)
    head = 384 * 192 * 4 + 2 * 192 + 192 * 96 * 4 + 2 * 96 + 96 * 96 * 9 + 2 * 96 + 96 * 19
    projection = 384 * 384 + 2 * 384 + 384 * 256 + 2 * 256
    assert row["params_m"] == round((22_056_192 + head + projection) / 1e6, 2)
    assert row["ms_per_step"] > 0
