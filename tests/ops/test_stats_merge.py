"""merge_stats (Chan et al.): stats of A merged with stats of B equal the stats of A and B."""

from __future__ import annotations

import pytest
import torch

from fastuda.ops import ClassStats, merge_stats, reference


def _direct(feats: torch.Tensor, labels: torch.Tensor, C: int, weights=None, cov="diag"):
    """Per-class statistics straight from the definition, one class at a time (fp64)."""
    D = feats.shape[1]
    count = torch.zeros(C, dtype=torch.float64)
    mean = torch.zeros(C, D, dtype=torch.float64)
    m2 = torch.zeros((C, D) if cov == "diag" else (C, D, D), dtype=torch.float64)
    w_all = torch.ones(len(labels), dtype=torch.float64) if weights is None else weights.double()
    for c in range(C):
        sel = labels == c
        if not sel.any():
            continue
        x, w = feats[sel].double(), w_all[sel]
        count[c] = w.sum()
        mean[c] = (w[:, None] * x).sum(0) / w.sum()
        d = x - mean[c]
        m2[c] = (w[:, None] * d * d).sum(0) if cov == "diag" else (w[:, None] * d).t() @ d
    return ClassStats(count, mean, m2)


def _split(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    cut = int(torch.randint(1, n - 1, (1,), generator=gen))
    return perm[:cut], perm[cut:]


def _close(a: ClassStats, b: ClassStats, tol: float = 1e-10) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("weighted", [False, True])
def test_merge_equals_pooled(cov, weighted):
    gen = torch.Generator().manual_seed(int(weighted) + 2 * (cov == "full"))
    N, D, C = 500, 6, 5
    feats = torch.randn(N, D, generator=gen, dtype=torch.float64) * 3 + 10
    labels = torch.randint(0, C, (N,), generator=gen)
    weights = torch.rand(N, generator=gen, dtype=torch.float64) if weighted else None
    a, b = _split(N, gen)

    def part(idx):
        return reference.class_stats(feats[idx], labels[idx], C, cov=cov,
                                     weights=None if weights is None else weights[idx])

    merged = merge_stats(part(a), part(b))
    _close(merged, _direct(feats, labels, C, weights, cov))
    _close(merged, reference.class_stats(feats, labels, C, cov=cov, weights=weights))


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_merge_with_empty_sides(cov):
    gen = torch.Generator().manual_seed(5)
    D, C = 4, 4
    fa = torch.randn(40, D, generator=gen, dtype=torch.float64)
    fb = torch.randn(30, D, generator=gen, dtype=torch.float64) + 2
    ya = torch.randint(0, 2, (40,), generator=gen)        # classes 0, 1 only
    yb = torch.randint(1, 3, (30,), generator=gen)        # classes 1, 2 only; 3 in neither
    sa = reference.class_stats(fa, ya, C, cov=cov)
    sb = reference.class_stats(fb, yb, C, cov=cov)
    merged = merge_stats(sa, sb)
    _close(merged, _direct(torch.cat([fa, fb]), torch.cat([ya, yb]), C, cov=cov))
    # a class present on one side only comes through bit for bit
    assert torch.equal(merged.mean[0], sa.mean[0]) and torch.equal(merged.m2[0], sa.m2[0])
    assert torch.equal(merged.mean[2], sb.mean[2]) and torch.equal(merged.m2[2], sb.m2[2])
    assert merged.count[3] == 0 and not merged.mean[3].any() and not merged.m2[3].any()
    # merging with all-empty stats is the identity
    empty = ClassStats(torch.zeros(C, dtype=torch.float64), torch.zeros(C, D, dtype=torch.float64),
                       torch.zeros_like(sa.m2))
    for x, y in zip(merge_stats(empty, sa), sa, strict=True):
        assert torch.equal(x, y)


def test_merge_order_does_not_matter():
    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(800, 3, generator=gen, dtype=torch.float64) + 50
    labels = torch.randint(0, 3, (800,), generator=gen)
    parts = [reference.class_stats(feats[i::4], labels[i::4], 3) for i in range(4)]
    left = merge_stats(merge_stats(merge_stats(parts[0], parts[1]), parts[2]), parts[3])
    tree = merge_stats(merge_stats(parts[3], parts[1]), merge_stats(parts[2], parts[0]))
    _close(left, tree, 1e-9)
    _close(left, _direct(feats, labels, 3), 1e-9)


def test_running_update_agrees_with_merge():
    """reference.running_update states the pooled update as SePiCo writes it (weight n/(n+Nc))."""
    gen = torch.Generator().manual_seed(7)
    C, D = 5, 4
    state = ClassStats(torch.zeros(C, dtype=torch.float64), torch.zeros(C, D, dtype=torch.float64),
                       torch.zeros(C, D, dtype=torch.float64))
    merged = state
    seen_f, seen_y = [], []
    for step in range(4):
        feats = torch.randn(60, D, generator=gen, dtype=torch.float64) * (step + 1) + step
        labels = torch.randint(0, C - 1, (60,), generator=gen)  # class C-1 is never seen
        batch = reference.class_stats(feats, labels, C)
        state = reference.running_update(state, batch)
        merged = merge_stats(merged, batch)
        seen_f.append(feats)
        seen_y.append(labels)
        _close(state, merged, 1e-9)
    _close(merged, _direct(torch.cat(seen_f), torch.cat(seen_y), C), 1e-9)
    assert merged.count[C - 1] == 0


def test_var_property():
    stats = ClassStats(torch.tensor([4.0, 0.0, 0.5]), torch.zeros(3, 2),
                       torch.tensor([[8.0, 4.0], [0.0, 0.0], [1.0, 2.0]]))
    torch.testing.assert_close(stats.var, torch.tensor([[2.0, 1.0], [0.0, 0.0], [2.0, 4.0]]))
