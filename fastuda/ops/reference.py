"""Plain PyTorch ground truth for every fastuda op.

The references (``class_stats``, ``proto_contrast``, ...) are the semantics of ops.md written as
directly as PyTorch allows. Tests compare every kernel against them; ``backend="torch"`` runs them;
the benchmark calls them "lean". They are differentiable through autograd. The published SePiCo
formulation, the benchmarks' other baseline, is not part of the library: benchmarks/sepico_style.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .stats import ClassStats, merge_stats


# ----------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------
def flatten_pixels(feats: Tensor, labels: Tensor, weights: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
    """[B, D, H, W] / [N, D] features and matching labels -> ([N, D], [N] long, [N] | None)."""
    if feats.dim() == 4:
        f = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    elif feats.dim() == 2:
        f = feats
    else:
        raise ValueError(f"feats must be [N, D] or [B, D, H, W], got shape {tuple(feats.shape)}")
    y = labels.reshape(-1).long()
    if y.numel() != f.shape[0]:
        raise ValueError(f"feats {tuple(feats.shape)} and labels {tuple(labels.shape)} "
                         "disagree on the number of pixels")
    w = None if weights is None else weights.reshape(-1)
    return f, y, w


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _zero_loss(feats: Tensor, *others: Tensor | None) -> Tensor:
    """0, still connected to the graph of every input (so DDP sees every parameter used)."""
    z = feats.sum() * 0.0
    for o in others:
        if o is not None and o.requires_grad:
            z = z + o.sum() * 0.0
    return z.to(_acc_dtype(feats))


def _reduce(per_pixel: Tensor, count: Tensor | int, reduction: str, shape: torch.Size,
            valid: Tensor) -> Tensor:
    if reduction == "none":
        out = per_pixel.new_zeros(valid.shape)
        out = out.masked_scatter(valid, per_pixel) if per_pixel.numel() else out
        return out.reshape(shape)
    if reduction == "sum":
        return per_pixel.sum()
    if reduction == "mean":
        return per_pixel.sum() / max(int(count), 1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------------------------
# 1. Class statistics
# ----------------------------------------------------------------------------------------------
def class_stats(feats: Tensor, labels: Tensor, num_classes: int, *, ignore_index: int = 255,
                weights: Tensor | None = None, cov: str = "diag") -> ClassStats:
    """Per-class count, mean and m2, two-pass (mean first, then centred squares). Sums are
    scattered per class (``index_add_``), so a NaN/Inf feature makes its own class's statistics
    non-finite and no other (a one-hot matmul would spread it: 0 * NaN = NaN), as the kernels do."""
    f, y, w = flatten_pixels(feats, labels, weights)
    acc = _acc_dtype(f)
    valid = y != ignore_index
    yv, fv = y[valid], f[valid].to(acc)
    wv = fv.new_ones(yv.shape) if w is None else w[valid].to(acc)
    count = fv.new_zeros(num_classes).index_add_(0, yv, wv)
    total = fv.new_zeros(num_classes, f.shape[1]).index_add_(0, yv, fv * wv[:, None])
    mean = total / count.clamp_min(1e-30)[:, None]
    mean = torch.where(count[:, None] > 0, mean, torch.zeros_like(mean))
    centred = fv - mean[yv]
    if cov == "diag":
        m2 = fv.new_zeros(num_classes, f.shape[1]).index_add_(0, yv, centred * centred
                                                                * wv[:, None])
    elif cov == "full":
        m2 = torch.stack([(centred[yv == c] * wv[yv == c, None]).t() @ centred[yv == c]
                          for c in range(num_classes)]) if num_classes else f.new_zeros(0, 0, 0)
    else:
        raise ValueError(f"cov must be 'diag' or 'full', got {cov!r}")
    return ClassStats(count, mean, m2)


def running_update(state: ClassStats, batch: ClassStats) -> ClassStats:
    """The pooled update of ops.md written as SePiCo states it (weight w = n / (n + Nc)).

    Equal to merge_stats; kept in this form as an independent check of the merge."""
    n = batch.count.to(state.count.dtype)
    total = state.count + n
    w = torch.where(total > 0, n / torch.where(total > 0, total, 1), 0)[:, None]
    var_s = state.m2 / state.count.clamp_min(1e-30)[:, None]
    var_b = batch.m2.to(var_s.dtype) / n.clamp_min(1e-30)[:, None]
    d = state.mean - batch.mean.to(state.mean.dtype)
    var = (1 - w) * var_s + w * var_b + w * (1 - w) * d * d
    mean = (1 - w) * state.mean + w * batch.mean.to(state.mean.dtype)
    return ClassStats(total, mean, var * total[:, None])


# ----------------------------------------------------------------------------------------------
# 3-4. Pixel-to-centroid and distributional contrast
# ----------------------------------------------------------------------------------------------
def proto_contrast(feats: Tensor, labels: Tensor, centroids: Tensor, *, tau: float,
                   ignore_index: int = 255, weights: Tensor | None = None,
                   reduction: str = "mean") -> Tensor:
    """l_i = -log softmax_c(f_i . mu_c / tau)[y_i], weighted, mean over valid pixels."""
    return dist_contrast(feats, labels, centroids, None, tau=tau, ignore_index=ignore_index,
                         weights=weights, reduction=reduction)


def dist_contrast(feats: Tensor, labels: Tensor, centroids: Tensor, covariance: Tensor | None,
                  *, tau: float, lam: float = 1.0, ignore_index: int = 255,
                  weights: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """l_i = -a_y + logsumexp_c(a_c + b_c), a_c = f.mu_c/tau, b_c = lam/(2 tau^2) f^T Sigma_c f.

    ``covariance`` [C, D] is a diagonal Sigma, [C, D, D] a full one, None gives proto_contrast."""
    f, y, w = flatten_pixels(feats, labels, weights)
    acc = _acc_dtype(f)
    valid = y != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        if reduction == "none":
            return _zero_loss(feats, centroids, covariance) + feats.new_zeros(
                labels.shape, dtype=acc)
        return _zero_loss(feats, centroids, covariance)
    fv, yv = f[valid].to(acc), y[valid]
    logits = fv @ centroids.to(acc).t() / tau
    if covariance is not None:
        cv = covariance.to(acc)
        if cv.dim() == 2:
            quad = (fv * fv) @ cv.t()
        else:
            quad = torch.einsum("nd,cde,ne->nc", fv, cv, fv)
        full = logits + lam / (2 * tau * tau) * quad
    else:
        full = logits
    per = torch.logsumexp(full, dim=1) - logits.gather(1, yv[:, None])[:, 0]
    if w is not None:
        per = per * w[valid].to(acc)
    return _reduce(per, n_valid, reduction, labels.shape, valid)


# ----------------------------------------------------------------------------------------------
# 5. Memory-bank contrast
# ----------------------------------------------------------------------------------------------
def bank_contrast(feats: Tensor, labels: Tensor, bank: Tensor, bank_len: Tensor, *, tau: float,
                  ignore_index: int = 255, reduction: str = "mean") -> Tensor:
    """Positives: every live bank entry of the pixel's class; negatives: the mean live entry of
    each other class with any. Pixels whose class has no live entry are skipped."""
    f, y, _ = flatten_pixels(feats, labels)
    acc = _acc_dtype(f)
    C, M, _D = bank.shape
    lens = bank_len.to(y.device).long()
    in_range = (y >= 0) & (y < C)
    valid = (y != ignore_index) & in_range
    valid = valid & (lens[torch.where(valid, y, 0)] > 0)
    n_valid = int(valid.sum())
    if n_valid == 0:
        if reduction == "none":
            return _zero_loss(feats, bank) + feats.new_zeros(labels.shape, dtype=acc)
        return _zero_loss(feats, bank)
    fv, yv = f[valid].to(acc), y[valid]
    b = bank.to(acc)
    live = torch.arange(M, device=b.device)[None, :] < lens[:, None]  # [C, M]
    bbar = (b * live[..., None]).sum(1) / lens.clamp_min(1)[:, None].to(acc)  # [C, D]
    neg = fv @ bbar.t() / tau  # [n, C]
    neg_ok = (lens > 0)[None, :] & (torch.arange(C, device=y.device)[None, :] != yv[:, None])
    neg_lse = torch.logsumexp(neg.masked_fill(~neg_ok, float("-inf")), dim=1)  # -inf if none
    pos = torch.einsum("nd,nmd->nm", fv, b[yv]) / tau  # [n, M]
    per_pair = pos - torch.logaddexp(pos, neg_lse[:, None])
    live_y = live[yv]
    per = -(per_pair * live_y).sum(1) / lens[yv].to(acc)
    return _reduce(per, n_valid, reduction, labels.shape, valid)


# ----------------------------------------------------------------------------------------------
# 6. Pixel-to-pixel contrast
# ----------------------------------------------------------------------------------------------
def pixel_contrast(feats: Tensor, labels: Tensor, *, tau: float, weights: Tensor | None = None,
                   pair_weights: Tensor | None = None, ignore_index: int = 255,
                   reduction: str = "mean") -> Tensor:
    """Supervised contrast among the valid pixels of a batch (features L2-normalised here).

    For anchor i: l_i = -(1/|P_i|) sum_p w_ip [s_ip - log(exp(s_ip) + sum_n exp(s_in))],
    s = cos/tau, w_ip = a_i a_p with ``pair_weights`` a (else 1). Anchors without a positive are
    skipped; the mean is over the anchors that count; ``weights`` scale each anchor's loss."""
    f, y, w = flatten_pixels(feats, labels, weights)
    acc = _acc_dtype(f)
    a = None if pair_weights is None else pair_weights.reshape(-1)
    valid = y != ignore_index
    fv, yv = F.normalize(f[valid].to(acc), dim=1), y[valid]
    n = fv.shape[0]
    s = fv @ fv.t() / tau
    same = yv[:, None] == yv[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    pos_mask, neg_mask = same & ~eye, ~same
    n_pos = pos_mask.sum(1)
    anchors = n_pos > 0
    if not bool(anchors.any()):
        if reduction == "none":
            return _zero_loss(feats, pair_weights) + feats.new_zeros(labels.shape, dtype=acc)
        return _zero_loss(feats, pair_weights)
    neg_lse = torch.logsumexp(s.masked_fill(~neg_mask, float("-inf")), dim=1)
    term = s - torch.logaddexp(s, neg_lse[:, None])
    if a is not None:
        av = a[valid].to(acc)
        term = term * (av[:, None] * av[None, :])
    per = -(term * pos_mask).sum(1) / n_pos.clamp_min(1)
    if w is not None:
        per = per * w[valid].to(acc)
    counted = valid.clone()
    counted[valid] = anchors
    return _reduce(per[anchors], int(anchors.sum()), reduction, labels.shape, counted)


# ----------------------------------------------------------------------------------------------
# 7. Label downscaling
# ----------------------------------------------------------------------------------------------
def downscale_labels(labels: Tensor, factor: int, *, num_classes: int, min_ratio: float = 0.75,
                     ignore_index: int = 255) -> Tensor:
    """Majority vote per factor x factor cell; ignore is its own candidate ranked after every class.

    The cell is ignore_index when the winner is ignore or covers < min_ratio of the cell."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {tuple(labels.shape)}")
    B, H, W = labels.shape
    if H % factor or W % factor:
        raise ValueError(f"labels {H}x{W} are not divisible by factor {factor}")
    y = labels.long()
    y = torch.where((y >= 0) & (y < num_classes), y, num_classes)  # ignore -> slot C
    onehot = F.one_hot(y, num_classes + 1).permute(0, 3, 1, 2).float()
    votes = F.avg_pool2d(onehot, factor)  # [B, C+1, h, w], fraction of the cell
    ratio, winner = votes.max(1)  # max returns the first (lowest id) among ties
    out = torch.where((winner == num_classes) | (ratio < min_ratio), ignore_index, winner)
    return out.to(labels.dtype if labels.dtype != torch.bool else torch.long)


__all__ = [
    "ClassStats", "merge_stats", "flatten_pixels", "class_stats", "running_update",
    "proto_contrast", "dist_contrast", "bank_contrast", "pixel_contrast", "downscale_labels",
]
