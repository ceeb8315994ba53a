"""pixel_contrast (CLUDA-style pixel-to-pixel contrast): the compiled CPU kernel against the
PyTorch reference (which builds the N x N matrix), forward and backward including the gradient of
the pair weights, plus gradcheck, opcheck, torch.compile, degenerate cases and errors."""

from __future__ import annotations

import pytest
import torch

from fastuda.ops import cuda_kernels_built, extension_available, pixel_contrast
from fastuda.ops._backend import as_bdp, as_bp, resolve

pytestmark = pytest.mark.skipif(not extension_available(), reason="fastuda._C is not built")

TAU = 0.3


def _labels(shape, C: int, seed: int = 1, ignore_frac: float = 0.2, dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = 255
    return y.to(dtype)


def _rand(shape, dtype=torch.float32, seed: int = 2, low: float | None = None):
    g = torch.Generator().manual_seed(seed)
    if low is not None:
        return (low + (1 - low) * torch.rand(shape, generator=g)).to(dtype)
    return torch.randn(shape, generator=g, dtype=dtype)


def _both(feats, labels, reduction="mean", weights=None, pair=None, tau=TAU):
    """(loss, grad feats, grad pair weights) of the kernel and of the reference."""
    out = []
    for backend in ("cpu", "torch"):
        f = feats.detach().clone().requires_grad_(True)
        a = None if pair is None else pair.detach().clone().requires_grad_(True)
        loss = pixel_contrast(f, labels, tau=tau, weights=weights, pair_weights=a,
                              reduction=reduction, backend=backend)
        scale = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        (loss * scale).sum().backward()
        out.append((loss.detach(), f.grad, None if a is None else a.grad))
    return out


def _close(kernel, ref, rtol=1e-4, atol=1e-6) -> None:
    for k, r in zip(kernel, ref, strict=True):
        if r is None:
            assert k is None
        else:
            torch.testing.assert_close(k, r.to(k.dtype), rtol=rtol, atol=atol)


LAYOUTS = {
    "nd": lambda: _rand((61, 10)),
    "bdhw": lambda: _rand((2, 10, 5, 7)),
    "channels_last": lambda: _rand((2, 10, 5, 7)).to(memory_format=torch.channels_last),
    "sliced": lambda: _rand((2, 20, 5, 9))[:, ::2, :, 1:8],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(layout: str, reduction: str) -> None:
    feats = LAYOUTS[layout]()
    shape = (feats.shape[0],) if feats.dim() == 2 else (feats.shape[0], *feats.shape[2:])
    _close(*_both(feats, _labels(shape, 4), reduction))


@pytest.mark.parametrize("with_weights", [False, True])
def test_pair_and_anchor_weights(with_weights: bool) -> None:
    feats = _rand((2, 10, 5, 7))
    labels = _labels((2, 5, 7), 3)
    pair = _rand((2, 5, 7), low=0.2, seed=5)
    weights = _rand((2, 5, 7), low=0.1, seed=6) if with_weights else None
    _close(*_both(feats, labels, "mean", weights, pair))


def test_anchor_weights_with_grad() -> None:
    """Anchor weights that require a gradient get it (applied outside the kernel)."""
    feats, labels = _rand((40, 6)), _labels((40,), 3)
    grads = []
    for backend in ("cpu", "torch"):
        w = _rand((40,), low=0.1, seed=7).requires_grad_(True)
        pixel_contrast(feats, labels, tau=TAU, weights=w, backend=backend).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_several_tiles() -> None:
    """More rows than one row block (128) and columns than one tile (512), imbalanced classes,
    so the tile skipping of the forward and every tile of the backward are exercised."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1300, 8, generator=g)
    labels = torch.multinomial(torch.tensor([0.55, 0.25, 0.1, 0.05, 0.05]), 1300, True,
                               generator=g)
    labels[::17] = 255
    pair = _rand((1300,), low=0.3, seed=4)
    _close(*_both(feats, labels, "mean", None, pair), rtol=1e-3, atol=1e-6)


def test_gradcheck_fp64() -> None:
    feats = _rand((13, 4), dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 2, 255, 1, 0, 2, 2, 1, 0, 255, 3])  # class 3 has no positive
    pair = _rand((13,), dtype=torch.float64, low=0.2, seed=5).requires_grad_(True)
    weights = _rand((13,), dtype=torch.float64, low=0.2, seed=6)
    assert torch.autograd.gradcheck(
        lambda f, a: pixel_contrast(f, labels, tau=0.5, weights=weights, pair_weights=a,
                                    reduction="none", backend="cpu"), (feats, pair))


def test_unit_normalize_matches_f_normalize() -> None:
    """The wrapper's normalisation: F.normalize's values and gradients (a zero pixel included,
    where the map is x / eps), in fp64 by gradcheck and in fp16 with an fp32 result."""
    from fastuda.ops.pixel_contrast import _UnitNormalize

    x = torch.randn(2, 5, 7, dtype=torch.float64)
    x[1, :, 3] = 0
    g = torch.randn(2, 5, 7, dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    ua, ub = _UnitNormalize.apply(a, torch.float64), torch.nn.functional.normalize(b, dim=1)
    torch.testing.assert_close(ua, ub, rtol=0, atol=1e-15)
    (ua * g).sum().backward()
    (ub * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)
    assert torch.equal(a.grad[1, :, 3], g[1, :, 3] / 1e-12)
    smooth = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _UnitNormalize.apply(t, torch.float64), (smooth,))
    h = torch.randn(1, 8, 5, dtype=torch.float16, requires_grad=True)
    u = _UnitNormalize.apply(h, torch.float32)
    assert u.dtype == torch.float32
    u.sum().backward()
    assert h.grad.dtype == torch.float16
    ref = h.detach().float().requires_grad_(True)
    torch.nn.functional.normalize(ref, dim=1).sum().backward()
    torch.testing.assert_close(h.grad.float(), ref.grad, rtol=2e-3, atol=1e-3)


def test_opcheck() -> None:
    feats = torch.nn.functional.normalize(as_bdp(_rand((2, 6, 4, 5))), dim=1).requires_grad_(True)
    labels = _labels((2, 4, 5), 3).reshape(2, 20)
    pair = _rand((2, 20), low=0.2).requires_grad_(True)
    weights = _rand((2, 20), low=0.2, seed=3)
    for args in ((feats, labels, TAU, 255, None, None), (feats, labels, TAU, 255, weights, pair)):
        torch.library.opcheck(torch.ops.fastuda.pixel_contrast_forward.default, args)


def test_torch_compile() -> None:
    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 8, 1)

        def forward(self, x, y, a):
            return pixel_contrast(self.proj(x), y, tau=TAU, pair_weights=a, backend="cpu")

    torch.manual_seed(0)
    head = Head()
    x, y = torch.randn(2, 3, 4, 5), _labels((2, 4, 5), 3)
    a = _rand((2, 4, 5), low=0.2)
    eager = head(x, y, a)
    eager.backward()
    g_eager = head.proj.weight.grad.clone()
    head.zero_grad()
    out = torch.compile(head, backend="aot_eager", fullgraph=True)(x, y, a)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(head.proj.weight.grad, g_eager)


@pytest.mark.parametrize("case", ["all_ignore", "no_positive", "single_class"])
def test_degenerate_batches(case: str) -> None:
    """Nothing counts (all ignored; every class once) or nothing contrasts (one class: no
    negatives, each term log(exp(s)/exp(s)) = 0): the loss is 0 yet connected to the graph, the
    gradients are exactly 0, never NaN, as the reference's."""
    feats = _rand((2, 6, 3, 4))
    labels = {"all_ignore": torch.full((2, 3, 4), 255),
              "no_positive": torch.arange(24).reshape(2, 3, 4),
              "single_class": torch.where(_labels((2, 3, 4), 2) == 255, 255, 1)}[case]
    pair = _rand((2, 3, 4), low=0.2)
    (lk, gk, ak), (lr, gr, ar) = _both(feats, labels, "mean", None, pair)
    assert lk.item() == 0.0 and lr.item() == 0.0
    assert torch.equal(gk, torch.zeros_like(gk)) and torch.equal(ak, torch.zeros_like(ak))
    assert not gr.isnan().any()
    f = feats.clone().requires_grad_(True)
    loss = pixel_contrast(f, labels, tau=TAU, backend="cpu")
    assert loss.requires_grad
    loss.backward()
    assert f.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype: torch.dtype) -> None:
    feats = _rand((2, 16, 5, 6)).to(dtype)
    labels = _labels((2, 5, 6), 3)
    (lk, gk, _), _ = _both(feats, labels)
    _, (lr, gr, _) = _both(feats.float(), labels)  # the reference on the same values, upcast
    assert lk.dtype == torch.float32 and gk.dtype == dtype
    torch.testing.assert_close(lk, lr, rtol=1e-4, atol=1e-5)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(gk.float(), gr, rtol=tol, atol=tol * gr.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(dtype: torch.dtype) -> None:
    feats, labels = _rand((2, 6, 3, 4)), _labels((2, 3, 4), 3)
    (lk, gk, _), (lr, gr, _) = _both(feats, labels.to(dtype))
    _close((lk, gk), (lr, gr))


def test_custom_ignore_index_and_any_label_value() -> None:
    """Any label value other than ignore_index is a class (negative ones too), as in the
    reference."""
    feats = _rand((30, 5))
    labels = _labels((30,), 3) * 1000 - 1  # classes -1, 999, 1999 and 254999
    labels[::7] = -5
    for ignore in (255, -5):
        kernel, ref = (pixel_contrast(feats, labels, tau=TAU, ignore_index=ignore, backend=b)
                       for b in ("cpu", "torch"))
        torch.testing.assert_close(kernel, ref)


def test_deterministic() -> None:
    feats, labels = _rand((600, 8)), _labels((600,), 4)
    (l1, g1, _), _ = _both(feats, labels)
    (l2, g2, _), _ = _both(feats, labels)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_errors() -> None:
    feats, labels = _rand((2, 6, 3, 4)), _labels((2, 3, 4), 3)
    with pytest.raises(ValueError, match=r"labels shape \(2, 3, 5\) does not match feats"):
        pixel_contrast(feats, torch.zeros(2, 3, 5, dtype=torch.long), tau=TAU, backend="cpu")
    with pytest.raises(ValueError, match=r"pair_weights shape \(2, 4, 4\) does not match"):
        pixel_contrast(feats, labels, tau=TAU, pair_weights=torch.ones(2, 4, 4), backend="cpu")
    with pytest.raises(TypeError, match="integer"):
        pixel_contrast(feats, labels.float(), tau=TAU, backend="cpu")
    with pytest.raises(ValueError, match="tau must be > 0"):
        pixel_contrast(feats, labels, tau=0.0, backend="cpu")
    with pytest.raises(RuntimeError, match=r"labels shape \[2, 12\] does not match feats"):
        torch.ops.fastuda.pixel_contrast_forward(as_bdp(feats)[:, :, :11], as_bp(labels, feats),
                                                 TAU, 255, None, None)


@pytest.mark.skipif(not cuda_kernels_built(), reason="fastuda._C was built without CUDA sources")
def test_auto_backend_on_cuda_tensors_prefers_the_cuda_kernel() -> None:
    """With the CUDA kernels built (no GPU needed to check the choice), backend="auto" on CUDA
    tensors picks them before Triton, the policy of every op."""
    import importlib
    module = importlib.import_module("fastuda.ops.pixel_contrast")
    supported = module._supported(False)  # without importing triton (see _supported)
    assert "cuda" in supported
    device = torch.device("cuda")
    assert resolve("pixel_contrast", "auto", device, supported=supported) == "cuda"
    assert resolve("pixel_contrast", "auto", device, supported=(*supported, "triton")) == "cuda"
