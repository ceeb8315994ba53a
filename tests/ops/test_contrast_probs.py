"""keep_probs: the CPU contrast kernels' forward keeps the softmax [B, C, P] and the backward
takes the class weights from it instead of recomputing the logits (csrc/cpu/contrast.cpp).

The kept probabilities are checked against a softmax computed here in fp64 from the definition,
and the backward with them against the backward that recomputes (the same arithmetic, so the
same bits); the GPU kernels (emulated CUDA, Triton interpreter) refuse the option with one clear
error, and the public functions ask for it exactly when a CPU gradient will be needed."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastuda.ops import dist_contrast, extension_available, proto_contrast
from fastuda.ops._backend import as_bdp, as_bp

pytestmark = pytest.mark.skipif(not extension_available(), reason="fastuda._C is not built")

OPS = torch.ops.fastuda
TAU, LAM = 0.4, 0.7


def _inputs(kind: str, B: int = 2, D: int = 12, H: int = 5, W: int = 7, C: int = 5,
            dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, D, H, W, generator=g).to(dtype)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < 0.2] = 255
    mu = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=1)
    cov = None
    if kind == "diag":
        cov = torch.rand(C, D, generator=g) * 0.1
    elif kind == "full":
        cov = torch.randn(C, D, D, generator=g) * 0.1 / D ** 0.5
    weights = torch.rand(B, H, W, generator=g)
    return feats, labels, mu, cov, weights


def _forward(feats, labels, mu, cov, weights, keep):
    fb, yb, wb = as_bdp(feats), as_bp(labels, feats), as_bp(weights, feats)
    if cov is None:
        return OPS.proto_contrast_forward(fb, yb, mu, TAU, 255, wb, keep)
    return OPS.dist_contrast_forward(fb, yb, mu, cov, TAU, LAM, 255, wb, keep)


def _backward(grad, feats, labels, mu, cov, weights, lse, stats_grad, probs):
    fb, yb, wb = as_bdp(feats), as_bp(labels, feats), as_bp(weights, feats)
    if cov is None:
        return OPS.proto_contrast_backward(grad, fb, yb, mu, lse, TAU, 255, wb, stats_grad, probs)
    return OPS.dist_contrast_backward(grad, fb, yb, mu, cov, lse, TAU, LAM, 255, wb, stats_grad,
                                      probs)


def _softmax_fp64(feats, mu, cov):
    """softmax_c(f.mu_c / tau + lam / (2 tau^2) f^T Sigma_c f) as [B, C, P], in fp64."""
    f = as_bdp(feats).double()  # [B, D, P]
    logits = torch.einsum("cd,bdp->bcp", mu.double(), f) / TAU
    if cov is not None:
        s = LAM / (2 * TAU * TAU)
        if cov.dim() == 2:
            logits = logits + s * torch.einsum("cd,bdp->bcp", cov.double(), f * f)
        else:
            logits = logits + s * torch.einsum("bdp,cde,bep->bcp", f, cov.double(), f)
    return torch.softmax(logits, dim=1)


@pytest.mark.parametrize("kind", [None, "diag", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kept_probs_are_the_softmax(kind, dtype) -> None:
    """35 pixels per image: one full tile of 32 and a partial one."""
    feats, labels, mu, cov, weights = _inputs(kind, dtype=dtype)
    loss, lse, probs = _forward(feats, labels, mu, cov, weights, True)
    loss0, lse0, none = _forward(feats, labels, mu, cov, weights, False)
    assert none.shape == (0, 0, 0)
    assert torch.equal(loss, loss0) and torch.equal(lse, lse0)
    B, C, P = feats.shape[0], mu.shape[0], feats.shape[2] * feats.shape[3]
    assert probs.shape == (B, C, P) and probs.dtype == loss.dtype
    want = _softmax_fp64(feats.double() if dtype != torch.bfloat16 else feats.float(), mu, cov)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(probs.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", [None, "diag", "full"])
@pytest.mark.parametrize("stats_grad", [False, True])
@pytest.mark.parametrize("layout", ["aligned", "channels_last", "odd"])
def test_backward_with_probs_is_the_recomputing_backward(kind, stats_grad, layout) -> None:
    """Same class weights, same GEMMs: the same gradients to the bit. "aligned": 64-byte rows
    read in place and gradients streamed; "channels_last": copied tiles; "odd": partial tiles."""
    shape = {"aligned": dict(H=8, W=16, D=16), "channels_last": dict(H=8, W=16, D=16),
             "odd": dict(H=5, W=7, D=13)}[layout]
    feats, labels, mu, cov, weights = _inputs(kind, **shape, seed=3)
    if layout == "channels_last":
        feats = feats.contiguous(memory_format=torch.channels_last)
    loss, lse, probs = _forward(feats, labels, mu, cov, weights, True)
    grad = torch.rand(loss.shape, generator=torch.Generator().manual_seed(5))
    with_probs = _backward(grad, feats, labels, mu, cov, weights, lse, stats_grad, probs)
    recomputed = _backward(grad, feats, labels, mu, cov, weights, lse, stats_grad, None)
    for got, want in zip(with_probs, recomputed, strict=True):
        assert torch.equal(got, want)


def test_nonfinite_probs_propagate() -> None:
    """A NaN feature makes its pixel's kept probabilities NaN, and its gradient NaN, as in the
    recomputing backward; the other pixels stay finite."""
    feats, labels, mu, cov, weights = _inputs("diag")
    labels[:] = 1
    feats[0, 3, 2, 4] = float("nan")
    loss, lse, probs = _forward(feats, labels, mu, cov, weights, True)
    pix = 2 * 7 + 4
    assert probs[0, :, pix].isnan().all() and probs[0, :, :pix].isfinite().all()
    grad = torch.ones(loss.shape)
    got = _backward(grad, feats, labels, mu, cov, weights, lse, False, probs)[0]
    want = _backward(grad, feats, labels, mu, cov, weights, lse, False, None)[0]
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    assert got[0, :, pix].isnan().all() and got[1].isfinite().all()


def test_probs_of_the_wrong_shape_is_an_error() -> None:
    feats, labels, mu, cov, weights = _inputs(None)
    loss, lse, probs = _forward(feats, labels, mu, cov, weights, True)
    with pytest.raises(ValueError, match=r"probs \[2, 4, 35\] must be \[B, C, P\] = \[2, 5, 35\]"):
        _backward(torch.ones(loss.shape), feats, labels, mu, cov, weights, lse, False,
                  probs[:, 1:])


def test_gpu_kernels_refuse_keep_probs() -> None:
    """The emulated CUDA kernels (the CUDA sources run on the host) and the Triton kernels (in
    the interpreter) recompute the softmax: asking them to keep it is an error, not ignored."""
    pytest.importorskip("fastuda._C_emu")
    import fastuda.ops.triton  # noqa: F401  (registers torch.ops.fastuda_triton)
    feats, labels, mu, cov, weights = _inputs("diag")
    fb, yb = as_bdp(feats), as_bp(labels, feats)
    for ns in (torch.ops.fastuda_emu, torch.ops.fastuda_triton):
        with pytest.raises(ValueError, match="keep_probs / probs are a CPU kernel option"):
            ns.proto_contrast_forward(fb, yb, mu, TAU, 255, None, True)
        with pytest.raises(ValueError, match="keep_probs / probs are a CPU kernel option"):
            ns.dist_contrast_forward(fb, yb, mu, cov, TAU, LAM, 255, None, True)
        loss, lse, _ = ns.dist_contrast_forward(fb, yb, mu, cov, TAU, LAM, 255, None)
        with pytest.raises(ValueError, match="keep_probs / probs are a CPU kernel option"):
            ns.dist_contrast_backward(torch.ones(loss.shape), fb, yb, mu, cov, lse, TAU, LAM,
                                      255, None, False, torch.ones(2, 5, 35))


class _KeepProbsArgs(TorchDispatchMode):
    """Records the keep_probs argument of every contrast forward call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().endswith("_contrast_forward") and "bank" not in func.name():
            self.seen.append(bool(args[-1]))
        return func(*args, **(kwargs or {}))


def test_public_functions_keep_probs_only_for_a_cpu_gradient() -> None:
    feats, labels, mu, cov, _ = _inputs("diag")
    f = feats.clone().requires_grad_(True)
    for fn in (lambda t: proto_contrast(t, labels, mu, tau=TAU, backend="cpu"),
               lambda t: dist_contrast(t, labels, mu, cov, tau=TAU, backend="cpu")):
        mode = _KeepProbsArgs()
        with mode:
            fn(f)  # a gradient will be asked for
            fn(feats)  # no input needs one
            with torch.no_grad():
                fn(f)
        assert mode.seen == [True, False, False]
