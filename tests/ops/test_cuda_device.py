"""The CUDA kernels on a real GPU (skipped without one): torch.ops.fastuda.* on CUDA tensors
against fastuda.ops.reference, at the published scales as well as on small odd shapes.

The same kernel sources run on the CPU through the host SIMT layer in test_cuda_emulated.py; these
tests add what only a device can show: the nvcc build, real launch configurations (many blocks,
SM-count-dependent grids) and the public ops dispatching to the CUDA backend with autograd."""

from __future__ import annotations

import pytest
import torch

import fastuda.ops as ops
from fastuda.ops import reference as ref
from fastuda.ops._backend import as_bdp, as_bp

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.cuda_kernels_built(),
                       reason="fastuda._C was built without its CUDA sources"),
]

DEV = "cuda"


def _case(seed: int, *, B: int, D: int, H: int, W: int, C: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = (torch.randn(B, D, H, W, generator=g) / D ** 0.5).to(dtype)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < 0.2] = 255
    return feats.to(DEV), labels.to(DEV)


SHAPES = [dict(B=2, D=37, H=9, W=11, C=5),       # odd sizes, tails everywhere
          dict(B=2, D=256, H=64, W=64, C=19)]    # DAFormer-like scale


@pytest.mark.parametrize("factor", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_downscale_labels(factor: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(factor)
    labels = torch.randint(0, 19, (2, 64, 128), generator=g).repeat_interleave(2, 2)[:, :, :128]
    labels[torch.rand(labels.shape, generator=g) < 0.1] = 255
    labels = labels.to(dtype).to(DEV)
    got = torch.ops.fastuda.downscale_labels(labels, factor, 19, 0.75, 255)
    assert torch.equal(got.cpu(), ref.downscale_labels(labels.cpu(), factor, num_classes=19))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_stats(shape: dict, cov: str, dtype: torch.dtype) -> None:
    C = shape["C"]
    feats, labels = _case(1, **shape, dtype=dtype)
    weights = torch.rand(labels.shape, device=DEV)
    got = torch.ops.fastuda.class_stats(as_bdp(feats), as_bp(labels, feats), C, 255,
                                        as_bp(weights, feats), cov == "full")
    want = ref.class_stats(feats.double(), labels, C, weights=weights.double(), cov=cov)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-3)
    again = torch.ops.fastuda.class_stats(as_bdp(feats), as_bp(labels, feats), C, 255,
                                          as_bp(weights, feats), cov == "full")
    for a, b in zip(got, again, strict=True):  # no floating-point atomics: bitwise reproducible
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cov", [None, "diag", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_contrast_forward_backward(shape: dict, cov: str | None, dtype: torch.dtype) -> None:
    C, D = shape["C"], shape["D"]
    if cov == "full" and D > 64:
        shape = dict(shape, H=16, W=16)  # the full quadratic form is N*C*D*D work
    feats, labels = _case(2, **shape, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    centroids = (torch.randn(C, D, generator=g) / D ** 0.5).to(DEV)
    covariance = None
    if cov == "diag":
        covariance = (torch.rand(C, D, generator=g) * 0.5).to(DEV)
    elif cov == "full":
        a = torch.randn(C, D, D, generator=g) / D
        covariance = (a @ a.transpose(1, 2)).to(DEV)
    weights = torch.rand(labels.shape, device=DEV)
    tau, lam = 0.2, 0.5
    fb, yb, wb = as_bdp(feats), as_bp(labels, feats), as_bp(weights, feats)
    if cov is None:
        loss, lse, _ = torch.ops.fastuda.proto_contrast_forward(fb, yb, centroids, tau, 255, wb)
    else:
        loss, lse, _ = torch.ops.fastuda.dist_contrast_forward(fb, yb, centroids, covariance, tau,
                                                            lam, 255, wb)
    f64 = feats.double().requires_grad_()
    c64 = centroids.double().requires_grad_()
    s64 = None if covariance is None else covariance.double().requires_grad_()
    want = as_bp(ref.dist_contrast(f64, labels, c64, s64, tau=tau, lam=lam, weights=weights,
                                   reduction="none"), feats)
    tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(loss.double(), want.detach(), atol=tol, rtol=tol)
    grad_loss = torch.rand(loss.shape, device=DEV)
    wanted = [f64, c64] + ([s64] if s64 is not None else [])
    grads = torch.autograd.grad((want * grad_loss.double()).sum(), wanted)
    if cov is None:
        gf, gc = torch.ops.fastuda.proto_contrast_backward(grad_loss, fb, yb, centroids, lse, tau,
                                                           255, wb, True)
        got = [gf.reshape(feats.shape), gc]
    else:
        gf, gc, gs = torch.ops.fastuda.dist_contrast_backward(grad_loss, fb, yb, centroids,
                                                              covariance, lse, tau, lam, 255, wb,
                                                              True)
        got = [gf.reshape(feats.shape), gc, gs]
    for a, b in zip(got, grads, strict=True):
        torch.testing.assert_close(a.double(), b, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("shape", SHAPES)
def test_bank_contrast(shape: dict) -> None:
    C, D, M = shape["C"], shape["D"], 5
    feats, labels = _case(4, **shape)
    g = torch.Generator().manual_seed(5)
    bank = (torch.randn(C, M, D, generator=g) / D ** 0.5).to(DEV)
    bank_len = torch.randint(0, M + 1, (C,), generator=g).to(DEV)
    fb, yb = as_bdp(feats), as_bp(labels, feats)
    loss, neg_lse = torch.ops.fastuda.bank_contrast_forward(fb, yb, bank, bank_len, 0.2, 255)
    f64 = feats.double().requires_grad_()
    want = as_bp(ref.bank_contrast(f64, labels, bank.double(), bank_len, tau=0.2,
                                   reduction="none"), feats)
    torch.testing.assert_close(loss.double(), want.detach(), atol=1e-4, rtol=1e-4)
    grad_loss = torch.rand(loss.shape, device=DEV)
    (want_grad,) = torch.autograd.grad((want * grad_loss.double()).sum(), [f64])
    gf = torch.ops.fastuda.bank_contrast_backward(grad_loss, fb, yb, bank, bank_len, neg_lse,
                                                  0.2, 255)
    torch.testing.assert_close(gf.reshape(feats.shape).double(), want_grad, atol=1e-4,
                               rtol=1e-3)


PIXEL_SHAPES = [dict(B=2, D=37, H=9, W=11, C=5),     # partial row blocks, tiles and stages
                dict(B=2, D=256, H=65, W=65, C=19)]  # the published scale (N = 2 * 65 * 65)


@pytest.mark.parametrize("shape", PIXEL_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pixel_contrast(shape: dict, layout: str, dtype: torch.dtype) -> None:
    """The public op with backend="cuda" (normalisation, kernels, autograd) against the reference
    in fp64 on the same values: loss, feature and pair-weight gradients."""
    feats, labels = _case(7, **shape, dtype=dtype)
    if layout == "channels_last":
        feats = feats.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(8)
    pair = (0.2 + torch.rand(labels.shape, generator=g)).to(DEV)
    weights = torch.rand(labels.shape, generator=g).to(DEV)
    f, a = feats.detach().clone().requires_grad_(), pair.clone().requires_grad_()
    loss = ops.pixel_contrast(f, labels, tau=0.2, weights=weights, pair_weights=a,
                              reduction="none", backend="cuda")
    f64, a64 = feats.double().requires_grad_(), pair.double().requires_grad_()
    want = ref.pixel_contrast(f64, labels, tau=0.2, weights=weights.double(), pair_weights=a64,
                              reduction="none")
    torch.testing.assert_close(loss.double(), want.detach(), atol=1e-4, rtol=1e-4)
    scale = torch.rand(loss.shape, device=DEV)
    (loss * scale).sum().backward()
    (want * scale.double()).sum().backward()
    # the feature gradient is returned in the features' dtype (bf16: 8 significant bits)
    gtol = 1e-3 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(f.grad.double(), f64.grad, atol=gtol, rtol=gtol)
    torch.testing.assert_close(a.grad.double(), a64.grad, atol=1e-3, rtol=1e-3)
    again = ops.pixel_contrast(feats, labels, tau=0.2, weights=weights, pair_weights=pair,
                               reduction="none", backend="cuda")
    assert torch.equal(loss.detach(), again)  # no floating-point atomics: bitwise reproducible


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_pixel_contrast_kernel_dtypes_and_degenerate_batches(dtype: torch.dtype) -> None:
    """The op itself on pixel-major fp16 / fp64 unit features (the kernels' own staging of those
    dtypes), all-ignore and single-class batches: zeros, never NaN."""
    feats, labels = _case(9, B=1, D=48, H=40, W=50, C=4)
    nd = torch.nn.functional.normalize(feats[0].flatten(1).t().double(), dim=1)  # [N, D] unit
    x = nd.to(dtype).t().unsqueeze(0)  # [1, D, N] with stride_d = 1
    y = as_bp(labels, feats)
    loss, nu, acc, n_pos = torch.ops.fastuda.pixel_contrast_forward(x, y, 0.3, 255, None, None)
    want = ref.pixel_contrast(x[0].t().double(), y[0], tau=0.3, reduction="none")
    tol = 1e-10 if dtype == torch.float64 else 3e-3
    torch.testing.assert_close(loss[0].double(), want, atol=tol, rtol=tol)
    for labels_case in (torch.full_like(y, 255), torch.where(y == 255, 255, 1)):
        out = torch.ops.fastuda.pixel_contrast_forward(x, labels_case, 0.3, 255, None, None)
        assert not out[0].any() and not out[2].any()
        gf, _ = torch.ops.fastuda.pixel_contrast_backward(torch.ones_like(out[0]), x, labels_case,
                                                          out[1], out[2], 0.3, 255, None, None)
        assert not gf.any()


def test_auto_backend_prefers_the_cuda_kernels() -> None:
    """backend="auto" on CUDA tensors: the CUDA kernel first, then Triton, as for every op."""
    import importlib

    from fastuda.ops import _backend
    for name in ("pixel_contrast", "bank_contrast"):
        module = importlib.import_module(f"fastuda.ops.{name}")
        supported = module._supported(True)
        assert "cuda" in supported, name
        assert _backend.resolve(name, "auto", torch.device(DEV), supported=supported) == "cuda"


def test_public_ops_use_the_cuda_backend_with_autograd() -> None:
    feats, labels = _case(6, B=2, D=64, H=16, W=16, C=7)
    feats.requires_grad_()
    centroids = torch.randn(7, 64, device=DEV, requires_grad=True)
    loss = ops.proto_contrast(feats, labels, centroids, tau=0.1, backend="cuda")
    loss.backward()
    f_ref = feats.detach().clone().requires_grad_()
    c_ref = centroids.detach().clone().requires_grad_()
    ref.proto_contrast(f_ref, labels, c_ref, tau=0.1).backward()
    torch.testing.assert_close(feats.grad, f_ref.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(centroids.grad, c_ref.grad, atol=1e-5, rtol=1e-4)
    stats = ops.class_stats(feats.detach(), labels, 7, backend="cuda")
    want = ref.class_stats(feats.detach(), labels, 7)
    torch.testing.assert_close(stats.mean, want.mean, atol=1e-5, rtol=1e-4)


_BAD_LABEL_CALLS = {
    "class_stats": "torch.ops.fastuda.class_stats(f, y, 5, 255, None, False)",
    "downscale_labels": "torch.ops.fastuda.downscale_labels(y.reshape(1, 10, 10), 2, 5, 255)",
    "proto_contrast": ("torch.ops.fastuda.proto_contrast_forward("
                       "f, y, torch.randn(5, 8, device='cuda'), 0.5, 255, None)"),
}


@pytest.mark.parametrize("op", sorted(_BAD_LABEL_CALLS))
def test_bad_label_is_a_device_side_assert(op: str) -> None:
    """A label outside [0, C) triggers a device-side assert naming the value; it poisons the CUDA
    context, so it runs in a child process."""
    import subprocess
    import sys
    code = (
        "import torch, fastuda.ops\n"
        "f = torch.randn(1, 8, 100, device='cuda')\n"
        "y = torch.zeros(1, 100, dtype=torch.long, device='cuda'); y[0, 7] = 42\n"
        f"{_BAD_LABEL_CALLS[op]}\n"
        "torch.cuda.synchronize()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert "label value 42 is outside [0, 5)" in out.stdout + out.stderr
