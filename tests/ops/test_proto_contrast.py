"""proto_contrast (ProtoCL): the compiled CPU kernel against the PyTorch reference, forward and
backward (feats and centroids), plus gradcheck, opcheck, torch.compile, the degenerate cases and
the error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastuda.ops import extension_available, proto_contrast
from fastuda.ops import reference as ref
from fastuda.ops._backend import as_bdp

pytestmark = pytest.mark.skipif(not extension_available(), reason="fastuda._C is not built")

TAU = 0.2


def _feats(shape, dtype=torch.float32, seed: int = 2, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * scale


def _labels(shape, C: int, seed: int = 1, ignore_frac: float = 0.2, dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = 255
    return y.to(dtype)


def _centroids(C: int, D: int, dtype=torch.float32, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(C, D, generator=g, dtype=dtype), dim=1)


def _pixel_shape(feats):
    return (feats.shape[0],) if feats.dim() == 2 else (feats.shape[0], *feats.shape[2:])


def _run(backend, feats, labels, centroids, *, tau=TAU, weights=None, reduction="mean",
         centroids_grad=True):
    """(loss, grad feats, grad centroids) of one backend; a non-uniform upstream gradient."""
    f = feats.detach().clone().requires_grad_(True)
    mu = centroids.detach().clone().requires_grad_(centroids_grad)
    loss = proto_contrast(f, labels, mu, tau=tau, weights=weights, reduction=reduction,
                          backend=backend)
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * up).sum().backward()
    return loss.detach(), f.grad, mu.grad


def _compare(feats, labels, centroids, *, rtol=1e-4, atol=1e-5, **kw):
    lk, gk, ck = _run("cpu", feats, labels, centroids, **kw)
    lr, gr, cr = _run("torch", feats, labels, centroids, **kw)
    assert lk.dtype == torch.float32 and gk.dtype == feats.dtype and gk.shape == feats.shape
    torch.testing.assert_close(lk, lr, rtol=rtol, atol=atol)
    torch.testing.assert_close(gk, gr, rtol=rtol, atol=atol)
    if ck is not None or cr is not None:
        torch.testing.assert_close(ck, cr, rtol=rtol, atol=atol)
    return lk, gk, ck


LAYOUTS = {
    "nd": lambda: _feats((53, 12)),
    "bdhw": lambda: _feats((2, 12, 5, 7)),
    "channels_last": lambda: _feats((2, 12, 5, 7)).to(memory_format=torch.channels_last),
    "sliced": lambda: _feats((2, 24, 5, 9))[:, ::2, :, 1:8],
    "strided_pixels": lambda: _feats((2, 12, 1, 70))[..., ::2],  # [B, D, P] view, P stride 2
    "nd_transposed": lambda: _feats((12, 53)).t(),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(layout: str, reduction: str) -> None:
    feats = LAYOUTS[layout]()
    labels = _labels(_pixel_shape(feats), 5)
    _compare(feats, labels, _centroids(5, 12), reduction=reduction)


@pytest.mark.parametrize("tau", [0.05, 100.0])
def test_more_classes_odd_sizes_and_extreme_tau(tau: float) -> None:
    """C = 19 (register blocks of 8 plus a tail), D and P not multiples of the tile; large logits
    at tau = 0.05 (features of norm ~ 5) stay finite."""
    feats = _feats((2, 37, 9, 11))
    labels = _labels((2, 9, 11), 19, ignore_frac=0.1)
    lk, gk, _ = _compare(feats, labels, _centroids(19, 37), tau=tau, rtol=2e-4, atol=1e-4)
    assert torch.isfinite(lk).all() and torch.isfinite(gk).all()


def test_weights() -> None:
    feats = _feats((2, 10, 6, 7))
    labels = _labels((2, 6, 7), 4)
    weights = torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(5))
    weights[0, 0] = 0.0
    for reduction in ("mean", "sum", "none"):
        _compare(feats, labels, _centroids(4, 10), weights=weights, reduction=reduction)
    # weights scale each pixel's loss; the mean still divides by the number of valid pixels
    plain = proto_contrast(feats, labels, _centroids(4, 10), tau=TAU, reduction="none",
                           backend="cpu")
    weighted = proto_contrast(feats, labels, _centroids(4, 10), tau=TAU, weights=weights,
                              reduction="none", backend="cpu")
    torch.testing.assert_close(weighted, plain * weights)
    mean = proto_contrast(feats, labels, _centroids(4, 10), tau=TAU, weights=weights,
                          backend="cpu")
    torch.testing.assert_close(mean, weighted.sum() / (labels != 255).sum())


def test_hand_computed_value() -> None:
    """Two pixels, two classes: l = log(1 + exp((f.mu_other - f.mu_y) / tau))."""
    feats = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    out = proto_contrast(feats, labels, mu, tau=0.5, reduction="none", backend="cpu")
    expected = torch.log1p(torch.exp(torch.tensor([(0.0 - 1.0) / 0.5, 0.0])))
    torch.testing.assert_close(out, expected)


def test_single_class_and_empty_classes() -> None:
    feats = _feats((2, 8, 5, 6))
    labels = torch.where(_labels((2, 5, 6), 3) == 255, 255, 2)  # classes 0, 1, 3 are empty
    _compare(feats, labels, _centroids(4, 8))


def test_centroids_without_grad() -> None:
    feats = _feats((2, 8, 5, 6))
    labels = _labels((2, 5, 6), 4)
    _, _, ck = _compare(feats, labels, _centroids(4, 8), centroids_grad=False)
    assert ck is None


def test_gradcheck_fp64() -> None:
    feats = _feats((2, 5, 3, 4), dtype=torch.float64).requires_grad_(True)
    labels = _labels((2, 3, 4), 3)
    mu = _centroids(3, 5, dtype=torch.float64).requires_grad_(True)
    weights = torch.rand(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(
        lambda f, m: proto_contrast(f, labels, m, tau=0.5, weights=weights, reduction="none",
                                    backend="cpu"), (feats, mu))


def test_opcheck() -> None:
    feats = as_bdp(_feats((2, 6, 4, 5))).requires_grad_(True)
    labels = _labels((2, 4, 5), 4).reshape(2, 20)
    mu = _centroids(4, 6).requires_grad_(True)
    weights = torch.rand(2, 20)
    op = torch.ops.fastuda.proto_contrast_forward.default
    torch.library.opcheck(op, (feats, labels, mu, TAU, 255, None))
    torch.library.opcheck(op, (feats, labels, mu.detach(), TAU, 255, weights))


def test_torch_compile() -> None:
    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 8, 1)

        def forward(self, x, y, mu, w):
            return proto_contrast(self.proj(x), y, mu, tau=TAU, weights=w, backend="cpu")

    torch.manual_seed(0)
    head = Head()
    x, y = torch.randn(2, 3, 4, 5), _labels((2, 4, 5), 3)
    mu, w = _centroids(3, 8), torch.rand(2, 4, 5)
    eager = head(x, y, mu, w)
    eager.backward()
    g_eager = head.proj.weight.grad.clone()
    head.zero_grad()
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    out = compiled(x, y, mu, w)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(head.proj.weight.grad, g_eager)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignore_gives_connected_zero(reduction: str) -> None:
    feats = _feats((2, 6, 3, 4)).requires_grad_(True)
    mu = _centroids(3, 6).requires_grad_(True)
    labels = torch.full((2, 3, 4), 255, dtype=torch.uint8)
    loss = proto_contrast(feats, labels, mu, tau=TAU, reduction=reduction, backend="cpu")
    assert loss.requires_grad and torch.equal(loss.detach(), torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))
    assert torch.equal(mu.grad, torch.zeros_like(mu))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype: torch.dtype) -> None:
    feats = _feats((2, 16, 6, 5)).to(dtype)
    labels = _labels((2, 6, 5), 4)
    mu = _centroids(4, 16)
    lk, gk, ck = _run("cpu", feats, labels, mu)
    assert lk.dtype == torch.float32 and gk.dtype == dtype
    lr, gr, cr = _run("torch", feats.float(), labels, mu)  # same values, upcast
    torch.testing.assert_close(lk, lr, rtol=1e-4, atol=1e-4)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(gk.float(), gr, rtol=tol, atol=tol * gr.abs().max().item())
    torch.testing.assert_close(ck, cr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(dtype: torch.dtype) -> None:
    feats = _feats((2, 6, 3, 4))
    labels = _labels((2, 3, 4), 3)
    lk, gk, ck = _run("cpu", feats, labels.to(dtype), _centroids(3, 6))
    lr, gr, cr = _run("cpu", feats, labels, _centroids(3, 6))
    assert torch.equal(lk, lr) and torch.equal(gk, gr) and torch.equal(ck, cr)


def test_other_ignore_index() -> None:
    feats = _feats((40, 6))
    labels = _labels((40,), 3)
    labels[labels == 255] = -1
    out = proto_contrast(feats, labels, _centroids(3, 6), tau=TAU, ignore_index=-1,
                         reduction="none", backend="cpu")
    expected = ref.proto_contrast(feats, labels, _centroids(3, 6), tau=TAU, ignore_index=-1,
                                  reduction="none")
    torch.testing.assert_close(out, expected)
    assert (out[labels == -1] == 0).all()


def test_deterministic() -> None:
    feats = _feats((2, 16, 20, 20))
    labels = _labels((2, 20, 20), 5)
    first = _run("cpu", feats, labels, _centroids(5, 16))
    second = _run("cpu", feats, labels, _centroids(5, 16))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_errors() -> None:
    feats = _feats((2, 6, 3, 4))
    mu = _centroids(3, 6)
    labels = _labels((2, 3, 4), 3)
    bad = labels.clone()
    bad[1, 2, 3] = 7
    with pytest.raises(ValueError, match=r"label value 7 .*outside \[0, 3\)"):
        proto_contrast(feats, bad, mu, tau=TAU, backend="cpu")
    with pytest.raises(ValueError, match=r"label value 7 .*outside \[0, 3\)"):  # direct op call
        torch.ops.fastuda.proto_contrast_forward(as_bdp(feats), bad.reshape(2, 12), mu, TAU, 255,
                                                 None)
    with pytest.raises(ValueError, match=r"centroids shape \(3, 5\) does not match .*D=6"):
        proto_contrast(feats, labels, mu[:, :5], tau=TAU, backend="cpu")
    with pytest.raises(ValueError, match=r"centroids shape \[3, 5\] does not match .*D=6"):
        torch.ops.fastuda.proto_contrast_forward(as_bdp(feats), labels.reshape(2, 12),
                                                 mu[:, :5], TAU, 255, None)
    with pytest.raises(ValueError, match=r"labels shape \(2, 3, 5\) does not match feats"):
        proto_contrast(feats, torch.zeros(2, 3, 5, dtype=torch.long), mu, tau=TAU, backend="cpu")
    with pytest.raises(TypeError, match="integer"):
        proto_contrast(feats, labels.float(), mu, tau=TAU, backend="cpu")
    with pytest.raises(ValueError, match="reduction"):
        proto_contrast(feats, labels, mu, tau=TAU, reduction="avg", backend="cpu")
    with pytest.raises(ValueError, match="tau must be > 0"):
        proto_contrast(feats, labels, mu, tau=0.0, backend="cpu")
    with pytest.raises(ValueError, match="backend 'cuda'"):
        proto_contrast(feats, labels, mu, tau=TAU, backend="cuda")


def test_large_aligned_image() -> None:
    """Many full tiles of a 64-byte aligned fp32 image: the in-place read with prefetch of later
    tiles and the streaming store of the gradient, against the reference."""
    feats = _feats((2, 24, 32, 40))
    labels = _labels((2, 32, 40), 7, ignore_frac=0.1)
    _compare(feats, labels, _centroids(7, 24), rtol=1e-4, atol=1e-5)


def test_same_result_for_any_thread_count() -> None:
    """Fixed work chunks merged in order: 1 and 2 threads give bit-identical loss and gradients."""
    feats = _feats((2, 16, 24, 40))
    labels = _labels((2, 24, 40), 6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("cpu", feats, labels, _centroids(6, 16), reduction="none")
        torch.set_num_threads(2)
        two = _run("cpu", feats, labels, _centroids(6, 16), reduction="none")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


_TRITON_DISPATCH = """
import torch
from fastuda.ops import dist_contrast, proto_contrast
from fastuda.ops.contrast import _supported
assert "triton" in _supported(True), _supported(True)
g = torch.Generator().manual_seed(0)
feats = torch.randn(2, 8, 3, 5, generator=g)
labels = torch.randint(0, 4, (2, 3, 5), generator=g)
labels[0, 0] = 255
mu = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
var = torch.rand(4, 8, generator=g) * 0.1
w = torch.rand(2, 3, 5, generator=g)
for reduction in ("mean", "none"):
    out = {}
    for backend in ("triton", "torch"):
        f = feats.clone().requires_grad_(True)
        m = mu.clone().requires_grad_(True)
        p = proto_contrast(f, labels, m, tau=0.5, weights=w, reduction=reduction, backend=backend)
        d = dist_contrast(f, labels, m, var, tau=0.5, weights=w, reduction=reduction,
                          backend=backend)
        (p.sum() + 2 * d.sum()).backward()
        out[backend] = (p.detach(), d.detach(), f.grad, m.grad)
    for a, b in zip(out["triton"], out["torch"], strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-5)
print("ok")
"""


def test_triton_backend_dispatch_in_interpreter() -> None:
    """backend="triton" reaches fastuda.ops.triton's per-pixel kernels (proto and dist, weights,
    both reductions) and matches the reference, loss and gradients. Triton's CPU interpreter
    must be on before triton is imported, so this runs in a fresh process."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _TRITON_DISPATCH], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
