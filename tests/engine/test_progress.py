"""The training progress display: a tqdm bar on a terminal, plain lines in a pipe, and the
evaluation table never written into the bar's line."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from fastuda.engine import logger as logger_mod
from fastuda.engine.logger import RunLogger, format_seconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_train import REPO, synthetic_root, tiny_overrides  # noqa: E402,F401  (fixture)


def test_format_seconds() -> None:
    assert format_seconds(0) == "0:00"
    assert format_seconds(75) == "1:15"
    assert format_seconds(3725) == "1:02:05"


def test_progress_line_rates_and_eta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(logger_mod.time, "monotonic", lambda: clock[0])
    log = RunLogger(tmp_path, total_iters=600, images_per_step=4, tensorboard=False)
    log.step(100, resumed=True)  # a resumed run: rates count from iteration 100
    clock[0] += 50.0
    log.step(20)
    # 20 iterations x 4 images in 50 s = 1.6 img/s; 480 iterations left at 2.5 s each = 1200 s
    line = log.progress_line(120, {"loss": 1.25, "src.ce": 0.5, "images_per_s": 9.0})
    assert line == ("iter 120/600 (20%) | 1.6 img/s | elapsed 0:50 | ETA 20:00 | "
                    "loss=1.25 src.ce=0.5")
    log.close()


def _train_args(root: str, work_dir: Path) -> list[str]:
    sets = tiny_overrides(root, REPO / "configs" / "demo_source_only.toml")
    sets += ["train.max_iters=4", "train.log_interval=2", "train.eval_interval=4",
             "train.checkpoint_interval=4"]
    return [sys.executable, "-m", "fastuda.train", "configs/demo_source_only.toml",
            "--work-dir", str(work_dir), *(x for s in sets for x in ("--set", s))]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", COLUMNS="150")


def test_pipe_gets_plain_lines(synthetic_root: str, tmp_path: Path) -> None:  # noqa: F811
    out = subprocess.run(_train_args(synthetic_root, tmp_path / "run"), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "\r" not in text  # no bar redrawn into a log
    lines = [x for x in text.splitlines() if x.startswith("iter ")]
    assert [x.split(" |")[0] for x in lines] == ["iter 2/4 (50%)", "iter 4/4 (100%)"]
    for line in lines:
        assert re.search(r"\| [\d.]+ img/s \| elapsed \d+:\d\d \| ETA \d+:\d\d \| .*loss=", line)
    assert "target mIoU:" in out.stdout


def test_terminal_gets_a_bar_and_whole_table_lines(synthetic_root: str,  # noqa: F811
                                                   tmp_path: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(_train_args(synthetic_root, tmp_path / "run"), cwd=REPO, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([master], [], [], 600)
        if not ready:
            proc.kill()
            pytest.fail("no output from the trainer for 600 s")
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    # the bar: iteration / max, ETA, images/s and the losses
    assert re.search(r"train 4/4 \|.*\| 100% \[elapsed \d+:\d\d, ETA \d+:\d\d, "
                     r"img/s=[\d.]+, .*loss=", text), text[-2000:]
    # every line of the evaluation table stands on a line of its own: the bar is cleared first
    table = text[text.index("evaluation at iteration 4:"):]
    for row in table.splitlines()[1:4]:
        row = row.split("\r")[-1] if "\r" in row else row
        assert re.fullmatch(r"\S+\s+(IoU|n/a|\s*[\d.]+)\s*", row), row
    assert "target mIoU:" in text
