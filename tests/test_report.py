"""``python -m fastuda.report``: seed statistics checked against numpy, the median-seed run and
its checkpoint, and runs that do not belong together refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastuda.config import load_config, to_toml
from fastuda.report import main

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["road", "sidewalk", "building"]


def _work_dir(root: Path, seed: int, evals: dict[int, dict], *, sets: tuple[str, ...] = (),
              snapshots: tuple[int, ...] = (), cut_off_line: bool = False) -> Path:
    wd = root / f"seed{seed}"
    (wd / "checkpoints").mkdir(parents=True)
    cfg = load_config(REPO / "configs" / "demo.toml", [f"train.seed={seed}", *sets])
    (wd / "config.toml").write_text(to_toml(cfg))
    lines = [json.dumps({"type": "train", "iter": 10, "loss": 1.0})]
    for it, rec in evals.items():
        lines.append(json.dumps({"type": "eval", "iter": it, **rec}))
    text = "\n".join(lines) + "\n"
    if cut_off_line:
        text += '{"type": "eval", "iter": 9'  # a run killed while writing
    (wd / "metrics.jsonl").write_text(text)
    for it in snapshots:
        (wd / "checkpoints" / f"iter_{it}.pt").write_bytes(b"x")
    return wd


def _record(miou: float, ious: list[float | None]) -> dict:
    return {"mIoU": miou, "IoU": dict(zip(CLASSES, ious, strict=True))}


def test_statistics_against_numpy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    final = {0: (51.3, [90.0, 60.0, None]), 1: (49.1, [88.5, 55.25, 3.0]),
             2: (50.2, [91.0, 58.0, 4.5]), 3: (47.9, [87.0, 54.0, 2.0])}
    dirs = []
    for seed, (miou, ious) in final.items():
        # an earlier evaluation at 100, and seed 2 evaluated 300 too (not common to all)
        evals = {100: _record(miou - 10, [1.0, 2.0, 3.0]), 200: _record(miou, ious)}
        if seed == 2:
            evals[300] = _record(99.0, [99.0, 99.0, 99.0])
        dirs.append(_work_dir(tmp_path, seed, evals, snapshots=(200,) if seed != 1 else (),
                              cut_off_line=seed == 3))
    out = tmp_path / "report.json"
    assert main([*map(str, dirs), "--json", str(out)]) == 0
    screen = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["iter"] == 200  # the last iteration every run evaluated
    mious = np.array([v[0] for v in final.values()])
    assert report["mIoU"]["mean"] == pytest.approx(mious.mean(), abs=1e-4)
    assert report["mIoU"]["std"] == pytest.approx(mious.std(ddof=1), abs=1e-4)
    assert report["mIoU"]["median"] == pytest.approx(np.median(mious), abs=1e-4)
    for c, name in enumerate(CLASSES):
        vals = np.array([v[1][c] for v in final.values() if v[1][c] is not None])
        st = report["IoU"][name]
        assert st["n"] == len(vals)
        assert st["mean"] == pytest.approx(vals.mean(), abs=1e-4)
        assert st["std"] == pytest.approx(vals.std(ddof=1), abs=1e-4)
        assert st["median"] == pytest.approx(np.median(vals), abs=1e-4)
    # four runs: the median is between 49.1 and 50.2; the median-seed run is the lower, seed 1,
    # which kept no iter_200.pt: its last evaluation is 200, so latest.pt would be named - there
    # is none either
    assert report["median_run"]["seed"] == 1 and report["median_run"]["checkpoint"] is None
    # by hand: mean 198.5 / 4, std sqrt(6.3875 / 3), median (49.1 + 50.2) / 2
    assert "| **mIoU** | 49.62 | 1.46 | 49.65 | 51.30 | 49.10 | 50.20 | 47.90 |" in screen
    assert "median-seed run" in screen and "seed 1" in screen

    # three runs: the median-seed run is seed 2, its snapshot named
    assert main([*map(str, dirs[:3]), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["median_run"]["seed"] == 2
    assert report["median_run"]["checkpoint"] == str(dirs[2] / "checkpoints" / "iter_200.pt")
    # --iter picks another evaluation
    assert main([*map(str, dirs), "--json", str(out), "--iter", "100"]) == 0
    assert json.loads(out.read_text())["mIoU"]["mean"] == pytest.approx(mious.mean() - 10,
                                                                        abs=1e-4)


def test_runs_that_do_not_belong_together(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rec = {100: _record(50.0, [1.0, 2.0, 3.0])}
    a = _work_dir(tmp_path / "a", 0, rec)
    b = _work_dir(tmp_path / "b", 1, rec, sets=("optim.lr=0.001",))
    c = _work_dir(tmp_path / "c", 0, rec, sets=("data.num_workers=0",))
    json_out = str(tmp_path / "r.json")
    assert main([str(a), str(b), "--json", json_out]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "optim.lr" in err
    assert main([str(a), str(c), "--json", json_out]) == 1  # same seed (num_workers is neutral)
    assert "both have train.seed = 0" in capsys.readouterr().err
    assert main([str(a), str(tmp_path / "nowhere"), "--json", json_out]) == 1
    assert "config.toml: not found" in capsys.readouterr().err
    d = _work_dir(tmp_path / "d", 2, {300: _record(50.0, [1.0, 2.0, 3.0])})
    assert main([str(a), str(d), "--json", json_out]) == 1
    assert "no iteration was evaluated in every run" in capsys.readouterr().err
