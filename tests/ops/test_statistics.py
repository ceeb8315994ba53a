"""ClassStatistics: the running estimator against batch statistics of all pixels at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastuda.ops import ClassStatistics, ClassStats, class_stats, extension_available

C, D = 5, 6
BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not extension_available(),
                                                         reason="fastuda._C is not built")),
            "torch"]


def _batches(seed: int, n: int = 4, dtype=torch.float64) -> list[tuple[torch.Tensor, ...]]:
    """Batches of [2, D, 5, 7] features with an offset, labels that miss some classes, weights."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        feats = (torch.randn(2, D, 5, 7, generator=gen, dtype=torch.float64) * (1 + i) + 20
                 ).to(dtype)
        labels = torch.randint(0, C - 1 if i % 2 else C, (2, 5, 7), generator=gen)
        labels[torch.rand(2, 5, 7, generator=gen) < 0.2] = 255
        weights = torch.rand(2, 5, 7, generator=gen)
        out.append((feats, labels, weights))
    return out


def _pooled(batches, cov: str, weighted: bool) -> ClassStats:
    """The statistics of every pixel of every batch in one class_stats call (reference, fp64)."""
    feats = torch.cat([f for f, _, _ in batches])
    labels = torch.cat([y for _, y, _ in batches])
    weights = torch.cat([w for _, _, w in batches]) if weighted else None
    return class_stats(feats, labels, C, cov=cov, weights=weights, backend="torch")


def _assert_stats(got: ClassStats, want: ClassStats, tol: float = 1e-9) -> None:
    for name, g, w in zip(("count", "mean", "m2"), got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("weighted", [False, True])
def test_updates_equal_pooled_statistics(backend, cov, weighted):
    batches = _batches(1)
    stats = ClassStatistics(C, D, cov=cov, backend=backend)
    for feats, labels, weights in batches:
        stats.update(feats, labels, weights if weighted else None)
    want = _pooled(batches, cov, weighted)
    assert stats.stats().count.dtype == torch.float64
    _assert_stats(stats.stats(), want)
    n = want.count.clamp_min(1e-30)
    torch.testing.assert_close(stats.mean, want.mean.float())
    torch.testing.assert_close(stats.count, want.count.float())
    var = want.m2 / (n[:, None] if cov == "diag" else n[:, None, None])
    torch.testing.assert_close(stats.covariance, var.float())
    if cov == "diag":
        torch.testing.assert_close(stats.var, var.float())
    else:
        with pytest.raises(AttributeError, match="cov='diag'"):
            _ = stats.var


def test_fp32_batches_and_absent_class_unchanged():
    batches = _batches(2, dtype=torch.float32)
    stats = ClassStatistics(C, D)
    stats.update(*batches[0][:2])
    before = [t.clone() for t in stats.stats()]
    feats, labels, _ = batches[1]
    labels = torch.where(labels == 2, torch.full_like(labels, 255), labels)
    batch = stats.update(feats, labels)
    assert batch.count[2] == 0
    after = stats.stats()
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a[2], b[2])  # class 2 absent from the batch: bit-for-bit unchanged
    assert not torch.equal(after.mean[0], before[1][0])
    want = _pooled([batches[0], (feats, labels, None)], "diag", weighted=False)
    _assert_stats(after, want, tol=1e-4)


def test_weighted_counts_below_one():
    """Variance divides by the (weighted) count itself, also when it is below 1."""
    stats = ClassStatistics(2, 1)
    feats = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    stats.update(feats, torch.tensor([0, 0]), torch.tensor([0.25, 0.25]))
    assert stats.count[0].item() == pytest.approx(0.5)
    assert stats.mean[0, 0].item() == pytest.approx(2.0)
    assert stats.var[0, 0].item() == pytest.approx(1.0)  # (0.25*1 + 0.25*1) / 0.5
    assert stats.var[1, 0].item() == 0.0


def test_momentum_mode():
    batches = _batches(3)
    m = 0.9
    stats = ClassStatistics(C, D, momentum=m)
    expected_mean = torch.zeros(C, D, dtype=torch.float64)
    seen = torch.zeros(C, dtype=torch.bool)
    m2_sum = torch.zeros(C, D, dtype=torch.float64)
    count = torch.zeros(C, dtype=torch.float64)
    for feats, labels, _ in batches:
        batch = class_stats(feats, labels, C, backend="torch")
        stats.update(feats, labels)
        present = batch.count > 0
        for c in range(C):
            if present[c]:
                expected_mean[c] = (batch.mean[c] if not seen[c]
                                    else m * expected_mean[c] + (1 - m) * batch.mean[c])
        seen |= present
        m2_sum += batch.m2
        count += batch.count
        torch.testing.assert_close(stats.stats().mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.stats().count, count)
    torch.testing.assert_close(stats.var, (m2_sum / count.clamp_min(1e-30)[:, None]).float())


def test_bank_ring_buffer():
    stats = ClassStatistics(3, 2, bank_size=3)
    means = []
    for i in range(5):
        feats = torch.randn(6, 2, dtype=torch.float64) + 10 * i
        # class 0 in every batch, class 1 in batches 1 and 3, class 2 never
        labels = torch.tensor([0, 0, 0, 1, 1, 1]) if i in (1, 3) else torch.zeros(6, dtype=int)
        means.append(class_stats(feats, labels, 3, backend="torch").mean.float())
        stats.update(feats, labels)
    assert stats.bank.shape == (3, 3, 2)
    assert stats.bank_len.tolist() == [3, 2, 0]
    # class 0 pushed 5 times: push k sits in slot k % 3, so slots hold pushes 3, 4, 2
    for slot, push in enumerate((3, 4, 2)):
        torch.testing.assert_close(stats.bank[0, slot], means[push][0])
    torch.testing.assert_close(stats.bank[1, 0], means[1][1])
    torch.testing.assert_close(stats.bank[1, 1], means[3][1])
    assert not stats.bank[1, 2].any() and not stats.bank[2].any()


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_state_dict_round_trip(tmp_path: Path, cov: str):
    batches = _batches(4)
    stats = ClassStatistics(C, D, cov=cov, bank_size=2)
    for feats, labels, weights in batches[:3]:
        stats.update(feats, labels, weights)
    path = tmp_path / "stats.pt"
    torch.save(stats.state_dict(), path)
    restored = ClassStatistics(C, D, cov=cov, bank_size=2)
    restored.load_state_dict(torch.load(path, weights_only=True))
    for key, value in stats.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    # both continue identically (the ring position is part of the state)
    for s in (stats, restored):
        s.update(*batches[3])
    for key, value in stats.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_load_state_dict_errors():
    stats = ClassStatistics(C, D)
    state = stats.state_dict()
    del state["bank_pos"]
    with pytest.raises(KeyError, match="bank_pos"):
        ClassStatistics(C, D).load_state_dict(state)
    full = ClassStatistics(C, D, cov="full").state_dict()
    with pytest.raises(ValueError, match=r"'m2' has shape \(5, 6, 6\), expected \(5, 6\)"):
        ClassStatistics(C, D).load_state_dict(full)


def test_argument_errors():
    with pytest.raises(ValueError, match="cov must be"):
        ClassStatistics(C, D, cov="dense")
    with pytest.raises(ValueError, match="momentum"):
        ClassStatistics(C, D, momentum=1.0)
    with pytest.raises(ValueError, match="bank_size"):
        ClassStatistics(C, D, bank_size=-1)
    stats = ClassStatistics(C, D)
    with pytest.raises(ValueError, match=r"feats have 4 channels .*dim 6"):
        stats.update(torch.randn(10, 4), torch.zeros(10, dtype=torch.long))
    # all_reduce without a process group is a no-op
    stats.update(torch.randn(10, D), torch.zeros(10, dtype=torch.long))
    before = [t.clone() for t in stats.stats()]
    stats.all_reduce()
    assert all(torch.equal(a, b) for a, b in zip(stats.stats(), before, strict=True))


# -- two processes, gloo ----------------------------------------------------------------------
def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        batches = _batches(5)
        result = {}
        for cov in ("diag", "full"):
            # running statistics of this rank's own batches, then pooled over ranks
            local = ClassStatistics(C, D, cov=cov)
            for feats, labels, weights in batches[rank::world]:
                local.merge(class_stats(feats, labels, C, cov=cov, weights=weights))
            local.all_reduce()
            result[f"all_reduce_{cov}"] = local.stats()
            # update() under a process group: each rank sees half of every batch's images
            synced = ClassStatistics(C, D, cov=cov, bank_size=2)
            for feats, labels, weights in batches:
                synced.update(feats[rank::world], labels[rank::world], weights[rank::world])
            result[f"update_{cov}"] = synced.stats()
            result[f"bank_{cov}"] = synced.bank.clone()
        torch.save({k: tuple(v) if isinstance(v, ClassStats) else v for k, v in result.items()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_two_processes(tmp_path: Path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    batches = _batches(5)
    for cov in ("diag", "full"):
        want = _pooled(batches, cov, weighted=True)
        one_process = ClassStatistics(C, D, cov=cov, bank_size=2)
        for batch in batches:
            one_process.update(*batch)
        for key in (f"all_reduce_{cov}", f"update_{cov}"):
            _assert_stats(ClassStats(*ranks[0][key]), want)
            _assert_stats(ClassStats(*ranks[0][key]), one_process.stats())
            # every rank holds bit-identical statistics
            assert all(torch.equal(a, b) for a, b in zip(ranks[0][key], ranks[1][key],
                                                          strict=True))
        torch.testing.assert_close(ranks[0][f"bank_{cov}"], one_process.bank)
        assert torch.equal(ranks[0][f"bank_{cov}"], ranks[1][f"bank_{cov}"])
