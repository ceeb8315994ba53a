"""What a run reports: a progress bar, metrics.jsonl, TensorBoard scalars, short readable lines.

Only rank 0 writes; the other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    def __init__(self, work_dir: str | Path, *, total_iters: int, start_iter: int = 0,
                 enabled: bool = True, tensorboard: bool = True, resumed: bool = False) -> None:
        """``start_iter``: the iteration the run continues from. What an earlier run of the work
        dir logged after it (it was killed after its last checkpoint) is dropped, from
        metrics.jsonl and from TensorBoard (``purge_step``), so no step appears twice."""
        self.enabled = enabled
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
        self._bar = tqdm(total=total_iters, initial=start_iter, dynamic_ncols=True,
                         disable=not sys.stderr.isatty() and not _force_bar(), unit="it",
                         desc="train")
        self._last_line = time.monotonic()

    def info(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg)

    def _record(self, record: dict[str, Any]) -> None:
        # strict JSON: an undefined value (NaN IoU, a non-finite loss) is null, never NaN
        self._jsonl.write(json.dumps(_strict(record), allow_nan=False) + "\n")

    def step(self, n: int = 1, postfix: dict[str, float] | None = None) -> None:
        if self.enabled and self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def log_train(self, it: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._record({"type": "train", "iter": it, **values})
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, it)
        if self._bar is not None and self._bar.disable:
            # no terminal: one compact line per log interval instead of a bar
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, float))
            self.info(f"iter {it}: {text}")

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
