"""python -m fastuda.profile: per-stage breakdown, kernel share, trace; StageTimer arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastuda import ops
from fastuda.config import load_config
from fastuda.data.synthetic import generate_synthetic
from fastuda.engine.profiling import STAGE_LABELS, StageTimer
from fastuda.profile import format_report, kernel_share, main, profile

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.toml"
# every stage a SePiCo step with self-training names (augment: strong augmentation)
STEP_STAGES = {"data", "teacher_forward", "statistics", "pseudo_labels", "mixing", "augment",
               "student_forward", "losses", "method_losses", "backward", "optimizer", "ema"}


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic(root, counts={"source": {"train": 8}, "target": {"train": 8, "val": 2}},
                       workers=1)
    sets = ["model.backbone='resnet18'", "model.embed_dim=16", "data.crop_size=[64, 64]",
            "data.num_workers=0", "data.rcs_min_pixels=10", "train.device='cpu'",
            "sepico.start_iter=0"]
    for dom, name, split in (("source", "synthetic_source", "train"),
                             ("target", "synthetic_target", "train"),
                             ("val", "synthetic_target", "val")):
        resize = "[96, 64]" if dom == "target" else "[]"
        sets += [f"data.{dom}.name={name!r}", f"data.{dom}.root={str(root)!r}",
                 f"data.{dom}.resize={resize}", f"data.{dom}.split={split!r}"]
    return sets


def test_breakdown_is_hand_computable() -> None:
    timer = StageTimer(enabled=True)
    timer.totals.update({"backward": 2.0, "data": 1.0, "custom": 0.5})
    rows = timer.breakdown(wall_seconds=4.0, steps=2)
    assert [r["stage"] for r in rows] == ["data", "backward", "custom", "other"]
    assert [r["ms_per_step"] for r in rows] == [500.0, 1000.0, 250.0, 250.0]
    assert [r["share"] for r in rows] == [0.25, 0.5, 0.125, 0.125]
    assert rows[0]["label"] == STAGE_LABELS["data"] and rows[2]["label"] == "custom"
    with pytest.raises(ValueError, match="steps >= 1"):
        timer.breakdown(1.0, 0)


def test_disabled_timer_records_nothing() -> None:
    timer = StageTimer()
    with timer("backward"):
        pass
    assert not timer.totals


@pytest.mark.skipif(not ops._backend.extension_available(), reason="fastuda._C is not built")
def test_kernel_share_counts_outermost_fastuda_ops() -> None:
    feats, labels = torch.randn(2, 8, 16, 16), torch.randint(0, 5, (2, 16, 16))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            ops.class_stats(feats, labels, 5, backend="cpu")
        torch.mm(torch.randn(64, 64), torch.randn(64, 64))
    events = [e for e in prof.events() if e.name == "fastuda::class_stats"]
    wall_us = 10.0 * sum(e.cpu_time_total for e in events)
    result = kernel_share(prof, wall_us / 1e6, cuda=False)
    assert result["ops"]["fastuda::class_stats"]["calls"] == 3
    assert result["share"] == pytest.approx(0.1)
    assert set(result["ops"]) == {"fastuda::class_stats"}


def test_profile_reports_every_stage_and_the_kernels(tiny_sets: list[str],
                                                     tmp_path: Path) -> None:
    cfg = load_config(DEMO, tiny_sets)
    report = profile(cfg, iters=2, warmup=1, profile_iters=1, trace_dir=str(tmp_path / "trace"))
    assert report is not None
    stages = {r["stage"]: r for r in report["stages"]}
    assert STEP_STAGES <= set(stages) and "other" in stages
    assert sum(r["share"] for r in report["stages"]) == pytest.approx(1.0)
    assert sum(r["ms_per_step"] for r in report["stages"]) == pytest.approx(report["ms_per_step"])
    assert all(stages[s]["ms_per_step"] > 0 for s in STEP_STAGES)
    assert report["images_per_s"] == pytest.approx(2 * 2 * 1000 / report["ms_per_step"])
    assert report["memory"]["peak_rss_mib"] > 0
    # a process cannot use more CPU than all the cores for the whole wall time
    assert 0 < report["cpu_ms_per_step"] <= report["ms_per_step"] * report["cpu_count"]
    assert len(report["load_average"]) == 2 and min(report["load_average"]) >= 0
    assert report["first_iter"] == 0 and report["non_finite_steps"] == 0
    kernels = report["kernels"]
    if ops._backend.extension_available():  # backend "auto" runs the compiled CPU kernels
        assert {"fastuda::class_stats", "fastuda::dist_contrast_forward",
                "fastuda::dist_contrast_backward"} <= set(kernels["ops"])
        assert 0 < kernels["share"] < 1
    trace = json.loads(Path(kernels["trace"]).read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"stage::student_forward", "stage::backward"} <= names
    text = format_report(report)
    for label in ("data wait", "backward", "images/s", "peak memory", "fastuda kernels"):
        assert label in text


def test_cli_reference_backend_spends_nothing_in_kernels(tiny_sets: list[str], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    args = [str(DEMO), "--iters", "1", "--warmup", "0", "--profile-iters", "1",
            "--json", str(tmp_path / "report.json"), "--set", "ops.backend='torch'"]
    for s in tiny_sets:
        args += ["--set", s]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["ops_backend"] == "torch"
    assert report["kernels"]["share"] == 0.0 and report["kernels"]["ops"] == {}
    assert "contrast losses (method)" in capsys.readouterr().out


def test_report_names_cpu_time_and_warns_under_load() -> None:
    report = {"config": {"model": "deeplabv2/resnet18", "method": "sepico", "crop_size": [8, 8],
                         "batch_size": 2, "precision": "fp32", "ops_backend": "auto"},
              "world_size": 1, "device": "CPU", "threads": 2, "iters": 4, "first_iter": 0,
              "warmup": 1, "ms_per_step": 800.0, "images_per_s": 5.0, "cpu_ms_per_step": 1200.0,
              "cpu_count": 2, "load_average": [1.5, 2.0], "stages": [],
              "memory": {"peak_rss_mib": 10.0}, "non_finite_steps": 0, "kernels": None}
    text = format_report(report)
    assert "process CPU time 1200.0 ms/step (1.50 cores busy)" in text  # 1200 / 800
    assert "load average 1.50 -> 2.00 on 2 CPUs" in text and "upper bounds" not in text
    report["load_average"] = [1.5, 5.25]  # above the 2 CPUs: someone else was running
    assert "wall times are upper bounds" in format_report(report)


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([str(DEMO), "--iters", "0"])
    assert "--iters must be >= 1" in capsys.readouterr().err
    assert main([str(DEMO), "--set", "train.max_iters=0"]) == 2
    assert "train.max_iters" in capsys.readouterr().err
