"""dist_contrast (DistCL upper bound): the compiled CPU kernel against the PyTorch reference for
diagonal [C, D] and full [C, D, D] covariances, forward and backward (feats, centroids,
covariance), plus gradcheck, opcheck, torch.compile, the degenerate cases and the errors."""

from __future__ import annotations

import pytest
import torch

from benchmarks import sepico_style
from fastuda.ops import dist_contrast, extension_available, proto_contrast
from fastuda.ops._backend import as_bdp

pytestmark = pytest.mark.skipif(not extension_available(), reason="fastuda._C is not built")

TAU = 0.3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _feats(shape, dtype=torch.float32, seed: int = 2):
    return torch.randn(shape, generator=_gen(seed), dtype=dtype)


def _labels(shape, C: int, seed: int = 1, ignore_frac: float = 0.2, dtype=torch.long):
    g = _gen(seed)
    y = torch.randint(0, C, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = 255
    return y.to(dtype)


def _centroids(C: int, D: int, dtype=torch.float32, seed: int = 3):
    return torch.nn.functional.normalize(torch.randn(C, D, generator=_gen(seed), dtype=dtype),
                                         dim=1)


def _covariance(kind: str, C: int, D: int, dtype=torch.float32, seed: int = 4, scale=0.05):
    """Diagonal: positive variances. Full: a non-symmetric matrix (the loss only sees its
    symmetric part; its gradient is still the full outer product)."""
    if kind == "diag":
        return torch.rand(C, D, generator=_gen(seed), dtype=dtype) * scale
    return torch.randn(C, D, D, generator=_gen(seed), dtype=dtype) * scale / D ** 0.5


def _pixel_shape(feats):
    return (feats.shape[0],) if feats.dim() == 2 else (feats.shape[0], *feats.shape[2:])


def _run(backend, feats, labels, centroids, covariance, *, tau=TAU, lam=1.0, weights=None,
         reduction="mean", stats_grad=(True, True)):
    """(loss, grad feats, grad centroids, grad covariance); a non-uniform upstream gradient."""
    f = feats.detach().clone().requires_grad_(True)
    mu = centroids.detach().clone().requires_grad_(stats_grad[0])
    cov = covariance.detach().clone().requires_grad_(stats_grad[1])
    loss = dist_contrast(f, labels, mu, cov, tau=tau, lam=lam, weights=weights,
                         reduction=reduction, backend=backend)
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * up).sum().backward()
    return loss.detach(), f.grad, mu.grad, cov.grad


def _compare(feats, labels, centroids, covariance, *, rtol=1e-4, atol=1e-5, **kw):
    kernel = _run("cpu", feats, labels, centroids, covariance, **kw)
    reference = _run("torch", feats, labels, centroids, covariance, **kw)
    assert kernel[0].dtype == torch.float32 and kernel[1].dtype == feats.dtype
    for k, r in zip(kernel, reference, strict=True):
        if k is None or r is None:
            assert k is None and r is None
        else:
            torch.testing.assert_close(k, r, rtol=rtol, atol=atol)
    return kernel


LAYOUTS = {
    "nd": lambda: _feats((53, 12)),
    "bdhw": lambda: _feats((2, 12, 5, 7)),
    "channels_last": lambda: _feats((2, 12, 5, 7)).to(memory_format=torch.channels_last),
    "sliced": lambda: _feats((2, 24, 5, 9))[:, ::2, :, 1:8],
    "strided_pixels": lambda: _feats((2, 12, 1, 70))[..., ::2],  # [B, D, P] view, P stride 2
}


@pytest.mark.parametrize("kind", ["diag", "full"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(kind: str, layout: str, reduction: str) -> None:
    feats = LAYOUTS[layout]()
    labels = _labels(_pixel_shape(feats), 5)
    _compare(feats, labels, _centroids(5, 12), _covariance(kind, 5, 12), reduction=reduction)


@pytest.mark.parametrize("kind", ["diag", "full"])
@pytest.mark.parametrize("tau", [0.1, 100.0])
def test_more_classes_odd_sizes(kind: str, tau: float) -> None:
    """C = 19, D and P off the tile and register-block sizes, sum reduction, lam != 1."""
    feats = _feats((2, 21, 7, 9))
    labels = _labels((2, 7, 9), 19, ignore_frac=0.1)
    out = _compare(feats, labels, _centroids(19, 21), _covariance(kind, 19, 21), tau=tau,
                   lam=0.7, reduction="sum", rtol=2e-4, atol=2e-4)
    assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [1, 7, 8, 9, 16, 17, 19, 25, 33])
def test_class_counts_across_gemm_blocks(C: int, dtype: torch.dtype) -> None:
    """The CPU GEMM's column blocks (two vectors, one vector, scalar tail) and row blocks (equal
    splits of C or D): class counts on both sides of each boundary, D = 29 off every block, and
    P = 4 * 37 so whole in-place tiles (with the prefetch of the tile after next) and a partial
    one are both used. Diagonal covariance and ProtoCL (no covariance), all gradients."""
    D = 29
    feats = _feats((2, D, 4, 37), dtype=dtype)
    labels = _labels((2, 4, 37), C, ignore_frac=0.1)
    mu, cov = _centroids(C, D, dtype=dtype), _covariance("diag", C, D, dtype=dtype)
    kernel = _run("cpu", feats, labels, mu, cov, lam=0.7, reduction="sum")
    reference = _run("torch", feats, labels, mu, cov, lam=0.7, reduction="sum")
    for k, r in zip(kernel, reference, strict=True):
        torch.testing.assert_close(k, r.to(k.dtype), rtol=2e-4, atol=2e-4)
    f = feats.detach().clone().requires_grad_(True)
    m = mu.detach().clone().requires_grad_(True)
    got = proto_contrast(f, labels, m, tau=TAU, reduction="sum", backend="cpu")
    got.backward()
    f_ref = feats.detach().clone().requires_grad_(True)
    m_ref = mu.detach().clone().requires_grad_(True)
    want = proto_contrast(f_ref, labels, m_ref, tau=TAU, reduction="sum", backend="torch")
    want.backward()
    torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(f.grad, f_ref.grad, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(m.grad, m_ref.grad, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_zero_covariance_is_proto_contrast(kind: str) -> None:
    feats = _feats((2, 8, 5, 6))
    labels = _labels((2, 5, 6), 4)
    mu = _centroids(4, 8)
    cov = torch.zeros_like(_covariance(kind, 4, 8))
    torch.testing.assert_close(
        dist_contrast(feats, labels, mu, cov, tau=TAU, reduction="none", backend="cpu"),
        proto_contrast(feats, labels, mu, tau=TAU, reduction="none", backend="cpu"))


def test_diag_equals_full_with_diagonal_matrix() -> None:
    feats = _feats((30, 7))
    labels = _labels((30,), 3)
    mu, var = _centroids(3, 7), _covariance("diag", 3, 7)
    diag = dist_contrast(feats, labels, mu, var, tau=TAU, reduction="none", backend="cpu")
    full = dist_contrast(feats, labels, mu, torch.diag_embed(var), tau=TAU, reduction="none",
                         backend="cpu")
    torch.testing.assert_close(diag, full)


def test_hand_computed_value() -> None:
    """One pixel f = (1, 0), classes mu_0 = (1, 0), mu_1 = (0, 1), var_1 = (2, 0), tau = lam = 1:
    l = -1 + log(e^1 + e^(0 + 0.5 * 2)) = log 2."""
    feats = torch.tensor([[1.0, 0.0]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    var = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    out = dist_contrast(feats, torch.tensor([0]), mu, var, tau=1.0, reduction="none",
                        backend="cpu")
    torch.testing.assert_close(out, torch.log(torch.tensor([2.0])))


def test_weights() -> None:
    feats = _feats((2, 10, 6, 7))
    labels = _labels((2, 6, 7), 4)
    weights = torch.rand(2, 6, 7, generator=_gen(5))
    for kind in ("diag", "full"):
        for reduction in ("mean", "sum", "none"):
            _compare(feats, labels, _centroids(4, 10), _covariance(kind, 4, 10),
                     weights=weights, reduction=reduction)


@pytest.mark.parametrize("which", [(True, False), (False, True), (False, False)])
def test_statistics_grad_only_when_asked(which) -> None:
    feats = _feats((2, 8, 5, 6))
    labels = _labels((2, 5, 6), 4)
    for kind in ("diag", "full"):
        out = _compare(feats, labels, _centroids(4, 8), _covariance(kind, 4, 8),
                       stats_grad=which)
        assert (out[2] is not None) == which[0] and (out[3] is not None) == which[1]


def test_single_class_and_empty_classes() -> None:
    feats = _feats((2, 8, 5, 6))
    labels = torch.where(_labels((2, 5, 6), 3) == 255, 255, 1)
    for kind in ("diag", "full"):
        _compare(feats, labels, _centroids(4, 8), _covariance(kind, 4, 8))


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_gradcheck_fp64(kind: str) -> None:
    feats = _feats((2, 4, 3, 3), dtype=torch.float64).requires_grad_(True)
    labels = _labels((2, 3, 3), 3)
    mu = _centroids(3, 4, dtype=torch.float64).requires_grad_(True)
    cov = _covariance(kind, 3, 4, dtype=torch.float64, scale=0.5).requires_grad_(True)
    weights = torch.rand(2, 3, 3, dtype=torch.float64, generator=_gen(0))
    assert torch.autograd.gradcheck(
        lambda f, m, c: dist_contrast(f, labels, m, c, tau=0.7, lam=0.8, weights=weights,
                                      reduction="none", backend="cpu"), (feats, mu, cov))


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_opcheck(kind: str) -> None:
    feats = as_bdp(_feats((2, 6, 4, 5))).requires_grad_(True)
    labels = _labels((2, 4, 5), 4).reshape(2, 20)
    mu = _centroids(4, 6).requires_grad_(True)
    cov = _covariance(kind, 4, 6).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastuda.dist_contrast_forward.default,
                          (feats, labels, mu, cov, TAU, 1.0, 255, torch.rand(2, 20)))


def test_torch_compile() -> None:
    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 8, 1)

        def forward(self, x, y, mu, var):
            return dist_contrast(self.proj(x), y, mu, var, tau=TAU, backend="cpu")

    torch.manual_seed(0)
    head = Head()
    x, y = torch.randn(2, 3, 4, 5), _labels((2, 4, 5), 3)
    mu, var = _centroids(3, 8), _covariance("diag", 3, 8)
    eager = head(x, y, mu, var)
    eager.backward()
    g_eager = head.proj.weight.grad.clone()
    head.zero_grad()
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    out = compiled(x, y, mu, var)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(head.proj.weight.grad, g_eager)


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_all_ignore_gives_connected_zero(kind: str) -> None:
    feats = _feats((2, 6, 3, 4)).requires_grad_(True)
    mu = _centroids(3, 6).requires_grad_(True)
    cov = _covariance(kind, 3, 6).requires_grad_(True)
    labels = torch.full((2, 3, 4), 255, dtype=torch.int32)
    loss = dist_contrast(feats, labels, mu, cov, tau=TAU, backend="cpu")
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for t in (feats, mu, cov):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype: torch.dtype) -> None:
    feats = _feats((2, 16, 6, 5)).to(dtype)
    labels = _labels((2, 6, 5), 4)
    for kind in ("diag", "full"):
        mu, cov = _centroids(4, 16), _covariance(kind, 4, 16)
        lk, gk, ck, vk = _run("cpu", feats, labels, mu, cov)
        assert lk.dtype == torch.float32 and gk.dtype == dtype
        lr, gr, cr, vr = _run("torch", feats.float(), labels, mu, cov)  # same values, upcast
        torch.testing.assert_close(lk, lr, rtol=1e-4, atol=1e-4)
        tol = 1e-2 if dtype == torch.float16 else 4e-2
        torch.testing.assert_close(gk.float(), gr, rtol=tol, atol=tol * gr.abs().max().item())
        torch.testing.assert_close(ck, cr, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vk, vr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_label_dtypes(dtype: torch.dtype) -> None:
    feats = _feats((2, 6, 3, 4))
    labels = _labels((2, 3, 4), 3)
    args = (_centroids(3, 6), _covariance("diag", 3, 6))
    first = _run("cpu", feats, labels.to(dtype), *args)
    second = _run("cpu", feats, labels, *args)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_deterministic() -> None:
    feats = _feats((2, 16, 20, 20))
    labels = _labels((2, 20, 20), 5)
    for kind in ("diag", "full"):
        args = (_centroids(5, 16), _covariance(kind, 5, 16))
        first = _run("cpu", feats, labels, *args)
        second = _run("cpu", feats, labels, *args)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_errors() -> None:
    feats = _feats((2, 6, 3, 4))
    mu, var = _centroids(3, 6), _covariance("diag", 3, 6)
    labels = _labels((2, 3, 4), 3)
    bad = labels.clone()
    bad[0, 1, 2] = 3
    with pytest.raises(ValueError, match=r"label value 3 .*outside \[0, 3\)"):
        dist_contrast(feats, bad, mu, var, tau=TAU, backend="cpu")
    with pytest.raises(ValueError, match=r"centroids shape \(3, 4\) does not match .*D=6"):
        dist_contrast(feats, labels, mu[:, :4], var, tau=TAU, backend="cpu")
    with pytest.raises(ValueError, match=r"covariance shape \(3, 5\) must be"):
        dist_contrast(feats, labels, mu, var[:, :5], tau=TAU, backend="cpu")
    with pytest.raises(ValueError, match=r"covariance shape \[2, 6\] must be"):
        torch.ops.fastuda.dist_contrast_forward(as_bdp(feats), labels.reshape(2, 12), mu,
                                                var[:2], TAU, 1.0, 255, None)
    with pytest.raises(ValueError, match=r"labels shape \[2, 11\] does not match feats shape"):
        torch.ops.fastuda.dist_contrast_forward(as_bdp(feats), labels.reshape(2, 12)[:, :11],
                                                mu, var, TAU, 1.0, 255, None)
    with pytest.raises(ValueError, match="tau must be > 0"):
        dist_contrast(feats, labels, mu, var, tau=-1.0, backend="cpu")


def test_reference_is_the_published_bound() -> None:
    """The reference used above agrees with the published [N, C, D] formulation."""
    feats = _feats((2, 8, 4, 5))
    labels = _labels((2, 4, 5), 4, ignore_frac=0.0)
    mu, var = _centroids(4, 8), _covariance("diag", 4, 8, scale=0.5)
    torch.testing.assert_close(
        dist_contrast(feats, labels, mu, var, tau=TAU, lam=1.0, backend="cpu"),
        sepico_style.dist_contrast(feats, labels, mu, var, tau=TAU, lam=1.0))


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_large_aligned_image(kind: str) -> None:
    """Many full tiles of a 64-byte aligned fp32 image (in-place reads, prefetch, streaming
    gradient stores, several partial-sum chunks), against the reference."""
    feats = _feats((2, 16, 32, 40))
    labels = _labels((2, 32, 40), 5, ignore_frac=0.1)
    _compare(feats, labels, _centroids(5, 16), _covariance(kind, 5, 16), rtol=1e-4, atol=2e-5)



@pytest.mark.parametrize("kind", ["diag", "full"])
def test_large_aligned_image_without_statistics_grads(kind: str) -> None:
    """As test_large_aligned_image, with centroids and covariance not requiring gradients (the
    training case): the streamed feature-gradient path without the statistics partials."""
    feats = _feats((2, 24, 32, 40))
    labels = _labels((2, 32, 40), 7, ignore_frac=0.1)
    _compare(feats, labels, _centroids(7, 24), _covariance(kind, 7, 24),
             stats_grad=(False, False), rtol=1e-4, atol=1e-5)
