"""Per-stage wall-clock accounting of a training step (used by ``python -m fastuda.profile`` and
``benchmarks/train_bench.py``).

``StageTimer`` is a no-op until enabled, so the training loop can name its stages at no cost.
On CUDA an enabled timer synchronises at stage boundaries so each stage is charged its own work.
Each stage is also a ``torch.profiler`` range named ``stage::<name>``, so a trace shows the step's
structure; the fastuda kernels themselves appear as ``fastuda::<op>``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

STAGE_PREFIX = "stage::"

# The stages the loop names (fastuda/train.py, fastuda/engine/self_training.py), in step order,
# with the words a report uses for them.
STAGE_LABELS: dict[str, str] = {
    "data": "data wait",
    "teacher_forward": "teacher forward (source)",
    "statistics": "class statistics update",
    "pseudo_labels": "pseudo-labels (teacher on target)",
    "mixing": "ClassMix",
    "augment": "strong augmentation",
    "student_forward": "student forward",
    "losses": "CE losses",
    "method_losses": "contrast losses (method)",
    "backward": "backward",
    "optimizer": "optimiser step",
    "ema": "teacher EMA",
}


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
        with torch.profiler.record_function(STAGE_PREFIX + name):
            yield
        if self.cuda:
            torch.cuda.synchronize()
        self.totals[name] += time.perf_counter() - t0
        self.counts[name] += 1

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()

    def breakdown(self, wall_seconds: float, steps: int) -> list[dict[str, object]]:
        """Rows ``{stage, label, ms_per_step, share}`` in step order, then unnamed stages, then
        "other" (wall time no stage accounts for: lr schedule, zero_grad, clipping, Python)."""
        if steps < 1:
            raise ValueError(f"breakdown needs steps >= 1, got {steps}")
        names = [n for n in STAGE_LABELS if n in self.totals]
        names += sorted(n for n in self.totals if n not in STAGE_LABELS)
        rows: list[dict[str, object]] = []
        for n in names:
            t = self.totals[n]
            rows.append({"stage": n, "label": STAGE_LABELS.get(n, n),
                         "ms_per_step": 1e3 * t / steps, "share": t / max(wall_seconds, 1e-12)})
        rest = wall_seconds - sum(self.totals.values())
        rows.append({"stage": "other", "label": "other (unnamed work)",
                     "ms_per_step": 1e3 * rest / steps, "share": rest / max(wall_seconds, 1e-12)})
        return rows
