"""The published SePiCo formulation of the estimator update and the three contrast losses: the
speed and memory baseline ("x published") of benchmarks/kernel_bench.py and
benchmarks/train_bench.py. Not part of the library (fastuda.ops.reference holds the ground truth).

Per-class statistics through expanded N x C x D tensors, permute + boolean-mask gathers, a Python
loop over class pairs for the bank loss, as in BIT-DA/SePiCo (files cited per function). Written
from that formulation; same values as fastuda.ops.reference (tests/ops/test_dist_contrast.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastuda.ops.stats import ClassStats


def _gather(feats: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Channels-last copy of the features, then a boolean-mask gather of the valid pixels."""
    D = feats.shape[1]
    f = feats.permute(0, 2, 3, 1).contiguous().view(-1, D) if feats.dim() == 4 else feats
    y = labels.contiguous().view(-1).long()
    mask = y != ignore_index
    return f[mask], y[mask]


def estimator_update(state: ClassStats, feats: Tensor, labels: Tensor,
                                  num_classes: int, ignore_index: int = 255) -> ClassStats:
    """One running-estimator update as the published code does it: N x C x D expanded tensors
    (BIT-DA/SePiCo mmseg/models/utils/proto_estimator.py:35-86, ProtoEstimator.update_proto)."""
    f, y = _gather(feats, labels, ignore_index)
    N, D = f.shape
    C = num_classes
    onehot = torch.zeros(N, C, device=f.device)
    onehot.scatter_(1, y.view(-1, 1), 1)
    onehot_ncd = onehot.view(N, C, 1).expand(N, C, D)
    by_class = f.view(N, 1, D).expand(N, C, D).mul(onehot_ncd)
    amount = onehot_ncd.sum(0)
    amount = amount.masked_fill(amount == 0, 1)
    ave = by_class.sum(0) / amount
    var_temp = (by_class - ave.expand(N, C, D)).mul(onehot_ncd)
    var_batch = var_temp.pow(2).sum(0) / amount
    n = onehot.sum(0).view(C, 1).expand(C, D)
    total = n + state.count.view(C, 1).expand(C, D).to(n.dtype)
    w = n / total.masked_fill(total == 0, 1)
    var_s = (state.m2 / state.count.clamp_min(1)[:, None]).to(n.dtype)
    mu_s = state.mean.to(n.dtype)
    extra = w * (1 - w) * (mu_s - ave).pow(2)
    var = var_s * (1 - w) + var_batch * w + extra
    mean = mu_s * (1 - w) + ave * w
    return ClassStats(total[:, 0], mean, var * total[:, :1])


def proto_contrast(feats: Tensor, labels: Tensor, centroids: Tensor, *, tau: float,
                                ignore_index: int = 255) -> Tensor:
    """Cross-entropy of the gathered pixels against the centroids
    (BIT-DA/SePiCo mmseg/models/losses/contrastive_loss.py:93-145, proto_contrastive)."""
    f, y = _gather(feats, labels, ignore_index)
    logits = f @ centroids.t() / tau
    return F.cross_entropy(logits, y)


def dist_contrast(feats: Tensor, labels: Tensor, centroids: Tensor, variance: Tensor,
                               *, tau: float, lam: float = 1.0, ignore_index: int = 255) -> Tensor:
    """The upper bound built through an [N, C, D] tensor, as published (BIT-DA/SePiCo
    mmseg/models/losses/contrastive_loss.py:148-219, dist_contrastive: CE at :195, the positive's
    variance term at :205)."""
    f, y = _gather(feats, labels, ignore_index)
    N, D = f.shape
    C = centroids.shape[0]
    logits = f @ centroids.t() / tau
    sigma2 = lam * variance.view(1, C, D).expand(N, C, D)
    quad = (f.view(N, 1, D).expand(N, C, D).pow(2) * sigma2).sum(2)
    aug = logits + 0.5 * quad / (tau * tau)
    onehot = F.one_hot(y, C).to(aug.dtype)
    # the published code adds the variance term to every logit and then removes it from the
    # positive one's numerator by hand; the value equals CE(a + b) + b_y
    return F.cross_entropy(aug, y) + (0.5 * quad / (tau * tau) * onehot).sum(1).mean()


def bank_contrast(feats: Tensor, labels: Tensor, bank: Tensor, bank_len: Tensor, *,
                               tau: float, ignore_index: int = 255) -> Tensor:
    """Bank loss with a Python loop over class pairs and all C x M negatives computed, then
    averaged (BIT-DA/SePiCo mmseg/models/losses/contrastive_loss.py:222-290, bank_contrastive:
    the mean negative logit at :270, the softmax term at :274)."""
    f, y = _gather(feats, labels, ignore_index)
    C, M, _ = bank.shape
    lens = bank_len.tolist()
    total, count = f.new_zeros(()), 0
    for c in range(C):
        idx = (y == c).nonzero()[:, 0]
        if idx.numel() == 0 or lens[c] == 0:
            continue
        fc = f[idx]
        pos = fc @ bank[c, :lens[c]].t() / tau  # [n, Lc]
        negs = []
        for k in range(C):
            if k == c or lens[k] == 0:
                continue
            # every entry's logit, then their mean: the logit of the class's mean entry
            negs.append((fc @ bank[k, :lens[k]].t() / tau).mean(1, keepdim=True))
        neg = torch.cat(negs, 1).exp().sum(1, keepdim=True) if negs else pos.new_zeros(len(idx), 1)
        loss = -(pos - torch.log(pos.exp() + neg)).mean(1)
        total = total + loss.sum()
        count += idx.numel()
    return total / max(count, 1)
