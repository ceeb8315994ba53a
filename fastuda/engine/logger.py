"""What a run reports: a progress bar, metrics.jsonl, TensorBoard scalars, short readable lines.

Only rank 0 writes; the other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    def __init__(self, work_dir: str | Path, *, total_iters: int, start_iter: int = 0,
                 enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.work_dir = Path(work_dir)
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.work_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.work_dir / "tensorboard"))
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
        self._jsonl.write(json.dumps(record) + "\n")

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


def _force_bar() -> bool:
    import os
    return os.environ.get("FASTUDA_PROGRESS", "") == "1"
