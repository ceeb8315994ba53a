"""Per-class feature statistics: the ``class_stats`` op and the running ``ClassStatistics``.

``class_stats`` reduces one batch to sufficient statistics (count, mean, m2) per class in one kernel
pass over channels-first features. ``ClassStatistics`` pools batches into dataset-level statistics
with the exact merge of ``stats.merge_stats`` (fp64 state), keeps an optional per-class memory bank
of batch centroids, checkpoints, and all-reduces across processes.

Statistics are not differentiable: the compiled op runs below autograd (its outputs never require
grad) and the reference path is evaluated under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import _backend, _op, reference
from .stats import ClassStats, merge_stats


def class_stats(feats: Tensor, labels: Tensor, num_classes: int, *, ignore_index: int = 255,
                weights: Tensor | None = None, cov: str = "diag",
                backend: str = "auto") -> ClassStats:
    """Per-class ``count [C]``, ``mean [C, D]`` and ``m2`` (``[C, D]`` diag, ``[C, D, D]`` full).

    feats ``[N, D]`` or ``[B, D, H, W]`` (fp32/fp16/bf16), labels ``[N]`` / ``[B, H, W]`` integer,
    weights (optional, >= 0) per pixel. Results are fp32 (fp64 for fp64 input). No gradients flow
    through the statistics (they are computed as under ``torch.no_grad()``)."""
    _backend.check_feats("class_stats", feats)
    _backend.check_labels("class_stats", labels)
    _backend.check_devices("class_stats", feats, weights=weights)
    if cov not in ("diag", "full"):
        raise ValueError(f"fastuda.ops.class_stats: cov must be 'diag' or 'full', got {cov!r}")
    if num_classes < 1:
        raise ValueError(f"fastuda.ops.class_stats: num_classes must be >= 1, got {num_classes}")
    labels_bp = _backend.as_bp(labels, feats)
    weights_bp = None if weights is None else _backend.as_bp(weights, feats, "weights")
    which = CLASS_STATS.dispatch(backend, feats.device, labels_bp, num_classes, ignore_index)
    if which == "torch":
        with torch.no_grad():
            return ClassStats(*reference.class_stats(feats, labels, num_classes,
                                                     ignore_index=ignore_index, weights=weights,
                                                     cov=cov))
    count, mean, m2 = torch.ops.fastuda.class_stats(
        _backend.as_bdp(feats), labels_bp, num_classes, ignore_index,
        None if weights_bp is None else weights_bp.float(), cov == "full")
    return ClassStats(count, mean, m2)


def _class_stats_fake(feats: Tensor, labels: Tensor, num_classes: int, ignore_index: int,
                      weights: Tensor | None, full_cov: bool) -> tuple[Tensor, Tensor, Tensor]:
    acc = _op.out_dtype(feats)
    D = feats.shape[1]
    m2_shape = (num_classes, D, D) if full_cov else (num_classes, D)
    return (feats.new_empty(num_classes, dtype=acc), feats.new_empty(num_classes, D, dtype=acc),
            feats.new_empty(m2_shape, dtype=acc))


# No Triton kernel: backend="triton" runs the compiled kernel of the tensor's device. No autograd:
# the statistics are not differentiable.
CLASS_STATS = _op.Op("class_stats", ("class_stats",), reference.class_stats,
                     {"class_stats": _class_stats_fake})
_op.register_compiled(CLASS_STATS)


class ClassStatistics:
    """Dataset-level class statistics for distribution-aware contrast (ops.md section 2).

    ``update`` merges a batch exactly (pooled mean/variance, fp64 state); with ``momentum`` set the
    means follow an EMA instead (mu <- m mu + (1 - m) m_batch for classes present in the batch) and
    the variance is the pooled within-batch variance (sum of the batches' m2 over their count).
    ``bank_size > 0`` keeps a ring buffer of the last ``bank_size`` batch centroids per class
    (slot ``k`` holds the class's push number ``k mod bank_size``; ``bank_len`` counts live slots).
    """

    def __init__(self, num_classes: int, dim: int, *, cov: str = "diag", bank_size: int = 0,
                 momentum: float | None = None, ignore_index: int = 255,
                 device: torch.device | str = "cpu", backend: str = "auto") -> None:
        if cov not in ("diag", "full"):
            raise ValueError(f"ClassStatistics: cov must be 'diag' or 'full', got {cov!r}")
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"ClassStatistics: momentum must be in [0, 1), got {momentum}")
        if bank_size < 0:
            raise ValueError(f"ClassStatistics: bank_size must be >= 0, got {bank_size}")
        if num_classes < 1 or dim < 1:
            raise ValueError(f"ClassStatistics: num_classes and dim must be >= 1, got "
                             f"{num_classes} and {dim}")
        self.num_classes, self.dim, self.cov = num_classes, dim, cov
        self.bank_size, self.momentum = bank_size, momentum
        self.ignore_index, self.backend = ignore_index, backend
        dev = torch.device(device)
        m2_shape = (num_classes, dim) if cov == "diag" else (num_classes, dim, dim)
        self._count = torch.zeros(num_classes, dtype=torch.float64, device=dev)
        self._mean = torch.zeros(num_classes, dim, dtype=torch.float64, device=dev)
        self._m2 = torch.zeros(m2_shape, dtype=torch.float64, device=dev)
        self.bank = torch.zeros(num_classes, max(bank_size, 0), dim, device=dev)
        self.bank_len = torch.zeros(num_classes, dtype=torch.long, device=dev)
        self._bank_pos = torch.zeros(num_classes, dtype=torch.long, device=dev)

    # -- updates ------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, feats: Tensor, labels: Tensor, weights: Tensor | None = None, *,
               group: dist.ProcessGroup | None = None) -> ClassStats:
        """Merge one batch; under torch.distributed the batch statistics of every rank are
        combined first, so all ranks hold identical state. Returns the (global) batch stats."""
        if feats.shape[1] != self.dim:
            raise ValueError(f"ClassStatistics: feats have {feats.shape[1]} channels "
                             f"(shape {tuple(feats.shape)}), the statistics have dim {self.dim}")
        batch = class_stats(feats.detach(), labels, self.num_classes,
                            ignore_index=self.ignore_index, weights=weights, cov=self.cov,
                            backend=self.backend)
        if dist.is_available() and dist.is_initialized():
            batch = all_reduce_stats(ClassStats(*(t.double() for t in batch)), group)
        self.merge(batch)
        return batch

    @torch.no_grad()
    def merge(self, batch: ClassStats) -> None:
        b = ClassStats(*(t.to(self._mean.device, torch.float64) for t in batch))
        present = b.count > 0
        if self.momentum is None:
            merged = merge_stats(ClassStats(self._count, self._mean, self._m2), b)
            self._count, self._mean, self._m2 = merged
        else:
            m = self.momentum
            mean = torch.where(present[:, None], m * self._mean + (1 - m) * b.mean, self._mean)
            first = present & (self._count == 0)  # a class seen for the first time takes m_batch
            self._mean = torch.where(first[:, None], b.mean, mean)
            self._m2 = self._m2 + b.m2
            self._count = self._count + b.count
        if self.bank_size > 0:
            self._push_bank(b.mean.to(self.bank.dtype), present)

    def _push_bank(self, centroids: Tensor, present: Tensor) -> None:
        classes = present.nonzero()[:, 0]
        pos = self._bank_pos[classes]
        self.bank[classes, pos] = centroids[classes]
        self._bank_pos[classes] = (pos + 1) % self.bank_size
        self.bank_len[classes] = (self.bank_len[classes] + 1).clamp_max(self.bank_size)

    # -- views for the losses -----------------------------------------------------------------
    @property
    def count(self) -> Tensor:
        return self._count.float()

    @property
    def mean(self) -> Tensor:
        return self._mean.float()

    @property
    def var(self) -> Tensor:
        if self.cov != "diag":
            raise AttributeError("ClassStatistics.var is for cov='diag'; use .covariance")
        return self.covariance

    @property
    def covariance(self) -> Tensor:
        """Diagonal variance [C, D] or full covariance [C, D, D] (fp32); 0 for unseen classes."""
        # weighted counts may be below 1: divide by the count itself, not by max(count, 1)
        n = torch.where(self._count > 0, self._count, torch.ones_like(self._count))
        return (self._m2 / (n[:, None] if self.cov == "diag" else n[:, None, None])).float()

    @property
    def cov_matrix(self) -> Tensor:
        if self.cov != "full":
            raise AttributeError("ClassStatistics.cov_matrix is for cov='full'; use .var")
        return self.covariance

    def stats(self) -> ClassStats:
        return ClassStats(self._count, self._mean, self._m2)

    # -- checkpointing and distribution -------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {"count": self._count.clone(), "mean": self._mean.clone(), "m2": self._m2.clone(),
                "bank": self.bank.clone(), "bank_len": self.bank_len.clone(),
                "bank_pos": self._bank_pos.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = {"count": self._count, "mean": self._mean, "m2": self._m2, "bank": self.bank,
                    "bank_len": self.bank_len, "bank_pos": self._bank_pos}
        missing = sorted(set(expected) - set(state))
        if missing:
            raise KeyError(f"ClassStatistics state is missing {missing}")
        for key, ref in expected.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise ValueError(f"ClassStatistics state {key!r} has shape "
                                 f"{tuple(state[key].shape)}, expected {tuple(ref.shape)}")
        self._count = state["count"].to(self._count)
        self._mean = state["mean"].to(self._mean)
        self._m2 = state["m2"].to(self._m2)
        self.bank = state["bank"].to(self.bank)
        self.bank_len = state["bank_len"].to(self.bank_len)
        self._bank_pos = state["bank_pos"].to(self._bank_pos)

    @torch.no_grad()
    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Pool the running statistics of every rank (each must cover its own, disjoint pixels):
        afterwards every rank holds what one process that saw all pixels would hold."""
        merged = all_reduce_stats(self.stats(), group)
        self._count, self._mean, self._m2 = (t.to(torch.float64) for t in merged)


def all_reduce_stats(stats: ClassStats, group: dist.ProcessGroup | None = None) -> ClassStats:
    """Exact pooled statistics over all ranks: gather every rank's (count, mean, m2) in fp64 and
    fold them with the Chan merge in rank order, so every rank computes bit-identical results.
    Without an initialised process group the statistics are returned unchanged."""
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    world = dist.get_world_size(group)
    if world == 1:
        return stats
    packed = torch.cat([stats.count[:, None].double(), stats.mean.double(),
                        stats.m2.double().reshape(stats.count.shape[0], -1)], dim=1)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed.contiguous(), group=group)
    D = stats.mean.shape[1]
    out: ClassStats | None = None
    for g in gathered:
        s = ClassStats(g[:, 0], g[:, 1:1 + D], g[:, 1 + D:].reshape(stats.m2.shape))
        out = s if out is None else merge_stats(out, s)
    assert out is not None
    return ClassStats(*(t.to(stats.mean.dtype) for t in out))
