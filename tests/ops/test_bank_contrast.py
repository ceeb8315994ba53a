"""bank_contrast (BankCL): the compiled CPU kernel against the PyTorch reference, forward and
backward, plus gradcheck, opcheck, torch.compile, the degenerate cases and the error messages."""

from __future__ import annotations

import pytest
import torch

from fastuda.ops import bank_contrast, extension_available
from fastuda.ops._backend import as_bdp, as_bp

pytestmark = pytest.mark.skipif(not extension_available(), reason="fastuda._C is not built")

TAU = 0.2


def _bank(C: int, M: int, D: int, lens: list[int], dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(C, M, D, generator=g, dtype=dtype), dim=2)
    return bank, torch.tensor(lens, dtype=torch.long)


def _labels(shape, C: int, seed: int = 1, ignore_frac: float = 0.2, dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = 255
    return y.to(dtype)


def _feats(shape, dtype=torch.float32, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def _both(feats, labels, bank, lens, reduction="mean", tau=TAU):
    """(loss, grad) of the kernel and of the reference on the same values."""
    out = []
    for backend in ("cpu", "torch"):
        f = feats.detach().clone().requires_grad_(True)
        loss = bank_contrast(f, labels, bank, lens, tau=tau, reduction=reduction,
                             backend=backend)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
        out.append((loss.detach(), f.grad))
    return out


LAYOUTS = {
    "nd": lambda: _feats((53, 12)),
    "bdhw": lambda: _feats((2, 12, 5, 7)),
    "channels_last": lambda: _feats((2, 12, 5, 7)).to(memory_format=torch.channels_last),
    "sliced": lambda: _feats((2, 24, 5, 9))[:, ::2, :, 1:8],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(layout: str, reduction: str) -> None:
    feats = LAYOUTS[layout]()
    shape = (feats.shape[0],) if feats.dim() == 2 else (feats.shape[0], *feats.shape[2:])
    labels = _labels(shape, 5)
    bank, lens = _bank(5, 6, 12, [6, 3, 0, 1, 6])  # full, partial, empty, single entry
    (lk, gk), (lr, gr) = _both(feats, labels, bank, lens, reduction)
    torch.testing.assert_close(lk, lr.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gk, gr, rtol=1e-4, atol=1e-6)
    assert gk.shape == feats.shape


def test_many_rows_and_classes() -> None:
    """More rows per class than one GEMM chunk, odd D, a bank with M > D."""
    feats = _feats((1, 33, 29, 31))
    labels = _labels((1, 29, 31), 4, ignore_frac=0.05)
    bank, lens = _bank(4, 40, 33, [40, 17, 40, 2])
    (lk, gk), (lr, gr) = _both(feats, labels, bank, lens)
    torch.testing.assert_close(lk, lr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gk, gr, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("layout", ["bdhw", "channels_last"])
def test_several_windows_per_image(layout: str) -> None:
    """Images of more pixels than one work window of the kernel (2048) and a class with more rows
    in one window than one GEMM chunk (256): P = 4500 is three windows per image, the last one
    partial, with about 600 pixels per class in a full window."""
    feats = _feats((2, 8, 50, 90))
    if layout == "channels_last":
        feats = feats.to(memory_format=torch.channels_last)
    labels = _labels((2, 50, 90), 3, ignore_frac=0.1)
    bank, lens = _bank(3, 5, 8, [5, 2, 5])
    (lk, gk), (lr, gr) = _both(feats, labels, bank, lens, reduction="none")
    torch.testing.assert_close(lk, lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gk, gr, rtol=1e-4, atol=1e-5)  # gradients up to ~5 here


def test_gradcheck_fp64() -> None:
    feats = _feats((2, 4, 3, 3), dtype=torch.float64).requires_grad_(True)
    labels = _labels((2, 3, 3), 3)
    bank, lens = _bank(3, 4, 4, [4, 2, 3], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda f: bank_contrast(f, labels, bank, lens, tau=0.5, reduction="none", backend="cpu"),
        (feats,))


def test_opcheck() -> None:
    feats = as_bdp(_feats((2, 6, 4, 5))).requires_grad_(True)
    labels = _labels((2, 4, 5), 4).reshape(2, 20)
    bank, lens = _bank(4, 5, 6, [5, 0, 2, 5])
    torch.library.opcheck(torch.ops.fastuda.bank_contrast_forward.default,
                          (feats, labels, bank, lens, TAU, 255))


def test_torch_compile() -> None:
    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 8, 1)

        def forward(self, x, y, bank, lens):
            return bank_contrast(self.proj(x), y, bank, lens, tau=TAU, backend="cpu")

    torch.manual_seed(0)
    head = Head()
    x, y = torch.randn(2, 3, 4, 5), _labels((2, 4, 5), 3)
    bank, lens = _bank(3, 4, 8, [4, 1, 3])
    eager = head(x, y, bank, lens)
    eager.backward()
    g_eager = head.proj.weight.grad.clone()
    head.zero_grad()
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    out = compiled(x, y, bank, lens)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(head.proj.weight.grad, g_eager)


@pytest.mark.parametrize("case", ["all_ignore", "no_live_bank", "class_without_entries"])
def test_nothing_counts_gives_connected_zero(case: str) -> None:
    feats = _feats((2, 6, 3, 4)).requires_grad_(True)
    labels = _labels((2, 3, 4), 3)
    lens = [3, 2, 1]
    if case == "all_ignore":
        labels = torch.full_like(labels, 255)
    elif case == "no_live_bank":
        lens = [0, 0, 0]
    else:
        labels = torch.where(labels == 255, 255, 2)
        lens = [3, 2, 0]
    bank, lens = _bank(3, 3, 6, lens)
    loss = bank_contrast(feats, labels, bank, lens, tau=TAU, backend="cpu")
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_single_class_has_no_negatives() -> None:
    """Only the pixel's own class has live entries: every term is log(exp(p)/exp(p)) = 0, the pixels
    still count, the gradient is exactly 0 and never NaN."""
    feats = _feats((2, 6, 3, 4))
    labels = torch.where(_labels((2, 3, 4), 3) == 255, 255, 1)
    bank, lens = _bank(3, 3, 6, [0, 3, 0])
    (lk, gk), (lr, gr) = _both(feats, labels, bank, lens)
    assert lk.item() == 0.0 and lr.item() == 0.0
    assert torch.equal(gk, torch.zeros_like(gk)) and not gr.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype: torch.dtype) -> None:
    feats = _feats((2, 16, 6, 5)).to(dtype)
    labels = _labels((2, 6, 5), 4)
    bank, lens = _bank(4, 5, 16, [5, 2, 5, 3])
    (lk, gk), (lr, gr) = _both(feats, labels, bank, lens)
    assert lk.dtype == torch.float32 and gk.dtype == dtype
    (_, _), (lr32, gr32) = _both(feats.float(), labels, bank, lens)
    torch.testing.assert_close(lk, lr32, rtol=1e-4, atol=1e-4)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(gk.float(), gr32, rtol=tol, atol=tol * gr32.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.int16])
def test_label_dtypes(dtype: torch.dtype) -> None:
    feats = _feats((2, 6, 3, 4))
    bank, lens = _bank(3, 3, 6, [3, 1, 2])
    labels = _labels((2, 3, 4), 3)
    (lk, gk), _ = _both(feats, labels.to(dtype), bank, lens)
    (lr, gr), _ = _both(feats, labels, bank, lens)
    torch.testing.assert_close(lk, lr)
    torch.testing.assert_close(gk, gr)


def test_deterministic() -> None:
    feats = _feats((2, 16, 20, 20))
    labels = _labels((2, 20, 20), 5)
    bank, lens = _bank(5, 7, 16, [7, 7, 3, 0, 7])
    (l1, g1), _ = _both(feats, labels, bank, lens)
    (l2, g2), _ = _both(feats, labels, bank, lens)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_errors() -> None:
    feats = _feats((2, 6, 3, 4))
    bank, lens = _bank(3, 3, 6, [3, 1, 2])
    labels = _labels((2, 3, 4), 3)
    bad = labels.clone()
    bad[1, 2, 3] = 7
    with pytest.raises(RuntimeError, match="label value 7 .*outside \\[0, 3\\)"):
        bank_contrast(feats, bad, bank, lens, tau=TAU, backend="cpu")
    with pytest.raises(ValueError, match=r"labels shape \(2, 3, 5\) does not match feats"):
        bank_contrast(feats, torch.zeros(2, 3, 5, dtype=torch.long), bank, lens, tau=TAU,
                      backend="cpu")
    with pytest.raises(ValueError, match="bank"):
        bank_contrast(feats, labels, bank[:, :, :5], lens, tau=TAU, backend="cpu")
    with pytest.raises(ValueError, match="no gradient"):
        bank_contrast(feats, labels, bank.requires_grad_(True), lens, tau=TAU, backend="cpu")
    bank = bank.detach()
    with pytest.raises(RuntimeError, match=r"bank_len\[1\] = 9 is outside \[0, 3\]"):
        bank_contrast(feats, labels, bank, torch.tensor([3, 9, 1]), tau=TAU, backend="cpu")
    with pytest.raises(TypeError, match="integer"):
        bank_contrast(feats, labels.float(), bank, lens, tau=TAU, backend="cpu")
    with pytest.raises(RuntimeError, match="label value -3"):  # straight to the op
        torch.ops.fastuda.bank_contrast_forward(as_bdp(feats), as_bp(labels, feats) * 0 - 3,
                                                bank, lens, TAU, 255)
