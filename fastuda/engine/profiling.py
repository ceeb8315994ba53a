"""Per-stage wall-clock accounting of a training step (used by ``python -m fastuda.profile``).

``StageTimer`` is a no-op until enabled, so the training loop can name its stages at no cost.
On CUDA an enabled timer synchronises at stage boundaries so each stage is charged its own work.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    def __init__(self, enabled: bool = False, device: torch.device | None = None) -> None:
        self.enabled = enabled
        self.cuda = device is not None and device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"fastuda::{name}"):
            yield
        if self.cuda:
            torch.cuda.synchronize()
        self.totals[name] += time.perf_counter() - t0
        self.counts[name] += 1

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()
