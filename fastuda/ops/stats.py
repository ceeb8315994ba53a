"""Sufficient statistics of per-class features and their exact merge (Chan et al.).

``ClassStats`` is what ``class_stats`` returns for one batch; ``merge_stats`` pools two sets of
statistics of disjoint pixel sets exactly. The running estimator and the distributed all-reduce are
both built on it, so there is one formula in one place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ClassStats(NamedTuple):
    """Per-class statistics: ``count [C]``, ``mean [C, D]``, ``m2 [C, D]`` (sum of squared
    deviations from the class mean) or ``[C, D, D]`` (sum of outer products of deviations)."""

    count: Tensor
    mean: Tensor
    m2: Tensor

    @property
    def var(self) -> Tensor:
        """Population variance (diag) or covariance (full); 0 for empty classes."""
        n = self.count.clamp_min(1e-12)
        return self.m2 / (n[:, None] if self.m2.dim() == 2 else n[:, None, None])


def merge_stats(a: ClassStats, b: ClassStats) -> ClassStats:
    """Exact pooled statistics of two disjoint pixel sets (Chan et al. parallel formula).

    A class empty in one side takes the other side unchanged. Works for diag and full m2.
    """
    n = a.count + b.count
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    w_b = (b.count / safe_n)[:, None]
    delta = b.mean - a.mean
    mean = a.mean + delta * w_b
    cross = (a.count * b.count / safe_n)[:, None]
    if a.m2.dim() == 2:
        m2 = a.m2 + b.m2 + delta * delta * cross
    else:
        m2 = a.m2 + b.m2 + delta[:, :, None] * delta[:, None, :] * cross[:, :, None]
    return ClassStats(n, mean, m2)
