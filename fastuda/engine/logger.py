"""What a run reports: a progress bar, metrics.jsonl, TensorBoard scalars, short readable lines.

On a terminal (stderr is a tty, or ``FASTUDA_PROGRESS=1``) a tqdm bar shows iteration / max,
elapsed < ETA, images/s and the main losses; messages and evaluation tables are written through
``tqdm.write`` so they appear above the bar, never inside it. Without a terminal (CI, nohup, a
pipe) there is no bar: each log interval prints one plain line with the same fields.

Only rank 0 writes; the other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    def __init__(self, work_dir: str | Path, *, total_iters: int, start_iter: int = 0,
                 images_per_step: int = 0, enabled: bool = True, tensorboard: bool = True,
                 resumed: bool = False) -> None:
        """``start_iter``: the iteration the run continues from. What an earlier run of the work
        dir logged after it (it was killed after its last checkpoint) is dropped, from
        metrics.jsonl and from TensorBoard (``purge_step``), so no step appears twice."""
        self.enabled = enabled
        self.total_iters = total_iters
        self.images_per_step = images_per_step
        self._iter = start_iter
        # iterations and time since this process started counting: the ETA and images/s of the
        # plain lines (evaluation time included, so the ETA is what a person waits)
        self._count_iter0, self._count_t0 = start_iter, time.monotonic()
        self.work_dir = Path(work_dir)
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / "metrics.jsonl"
        _drop_records_after(path, start_iter)
        self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                purge = start_iter + 1 if resumed else 0
                self._tb = SummaryWriter(str(self.work_dir / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is a dependency, but keep training without it
                self.info("tensorboard is not installed: no TensorBoard scalars")
        # a terminal that reports no size (an unsized pty) gets no bar at all from tqdm's own
        # probe (0 columns, 0 rows): give it the usual fallback size there
        sized = _terminal_columns() > 0
        fallback = shutil.get_terminal_size()
        self._bar = tqdm(total=total_iters, initial=start_iter, dynamic_ncols=sized,
                         ncols=None if sized else fallback.columns,
                         nrows=None if sized else fallback.lines,
                         disable=not sys.stderr.isatty() and not _force_bar(), unit="it",
                         desc="train", bar_format=BAR_FORMAT)

    def info(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg)

    def _record(self, record: dict[str, Any]) -> None:
        # strict JSON: an undefined value (NaN IoU, a non-finite loss) is null, never NaN
        self._jsonl.write(json.dumps(_strict(record), allow_nan=False) + "\n")

    def step(self, n: int = 1, postfix: dict[str, float] | None = None, *,
             resumed: bool = False) -> None:
        """``n`` iterations done; ``resumed=True`` jumps to a resumed run's iteration (the
        rates then count from here)."""
        if not self.enabled:
            return
        self._iter += n
        if resumed:
            self._count_iter0, self._count_t0 = self._iter, time.monotonic()
        if self._bar is not None and not self._bar.disable:
            if resumed:  # start the bar at the resumed iteration, with no rate from the jump
                self._bar.reset(total=self.total_iters)
                self._bar.n = self._bar.initial = self._bar.last_print_n = self._iter
                self._bar.refresh()
                return
            fields = {}
            rate = self._bar.format_dict.get("rate")
            if rate and self.images_per_step:
                fields["img/s"] = f"{rate * self.images_per_step:.3g}"
            fields.update({k: f"{v:.4g}" for k, v in (postfix or {}).items()})
            self._bar.set_postfix(fields, refresh=False)
            self._bar.update(n)

    def progress_line(self, it: int, values: dict[str, float]) -> str:
        """``iter 120/600 (20%) | 2.47 img/s | elapsed 0:48 | ETA 3:14 | loss=1.2 ...``"""
        done = it - self._count_iter0
        elapsed = time.monotonic() - self._count_t0
        parts = [f"iter {it}/{self.total_iters} ({100 * it / max(self.total_iters, 1):.0f}%)"]
        if done > 0 and elapsed > 0:
            if self.images_per_step:
                parts.append(f"{done * self.images_per_step / elapsed:.3g} img/s")
            eta = (self.total_iters - it) * elapsed / done
            parts.append(f"elapsed {format_seconds(elapsed)}")
            parts.append(f"ETA {format_seconds(eta)}")
        losses = " ".join(f"{k}={v:.4g}" for k, v in values.items()
                          if isinstance(v, float) and k != "images_per_s")
        if losses:
            parts.append(losses)
        return " | ".join(parts)

    def log_train(self, it: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._record({"type": "train", "iter": it, **values})
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, it)
        if self._bar is not None and self._bar.disable:
            self.info(self.progress_line(it, values))  # no terminal: a line instead of a bar

    def log_eval(self, it: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._record({"type": "eval", "iter": it, **record})
        if self._tb is not None:
            for k, v in record.items():
                if k.startswith("mIoU") and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"val/{k}", v, it)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()


BAR_FORMAT = ("{desc} {n_fmt}/{total_fmt} |{bar}| {percentage:3.0f}% "
              "[elapsed {elapsed}, ETA {remaining}{postfix}]")


def format_seconds(seconds: float) -> str:
    """3725 -> '1:02:05', 75 -> '1:15'."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0
def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _drop_records_after(path: Path, iteration: int) -> None:
    """Keep the metrics.jsonl records up to ``iteration`` (atomically rewritten when any go)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
        if isinstance(record, dict) and record.get("iter", 0) <= iteration:
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _force_bar() -> bool:
    return os.environ.get("FASTUDA_PROGRESS", "") == "1"
