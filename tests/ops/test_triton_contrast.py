"""The Triton contrast kernels (fastuda.ops.triton) against fastuda.ops.reference.

Without a GPU the kernels run in Triton's CPU interpreter, which must be on (TRITON_INTERPRET=1)
when triton is first imported: Triton decorates its own tl.* library functions at import time.
This module switches it on when it is the first to import triton in a CPU-only process. When
triton was already imported without it (another test module imported it first, or a GPU is
visible so the `cuda` tests run natively), the interpreter tests are skipped in this process and
`test_interpreter_suite_in_subprocess` runs them in a fresh interpreter-mode pytest process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fastuda.ops import reference as ref  # noqa: E402
from fastuda.ops.triton import contrast as tc  # noqa: E402

INTERPRETER = (isinstance(tl.sum, InterpretedFunction)
               and isinstance(tc._centroid_fwd_kernel, InterpretedFunction))
interp = pytest.mark.skipif(not INTERPRETER, reason="triton was imported without "
                            "TRITON_INTERPRET=1 in this process (see the subprocess test)")

IGN = 255


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _ref_bdp(fn, feats, labels, *args, weights=None, pair_weights=None, **kw):
    """Reference per-pixel loss for [B, D, P] feats: viewed as [B, D, P, 1] images."""
    B, _, P = feats.shape
    extra = {}
    if weights is not None:
        extra["weights"] = weights
    if pair_weights is not None:
        extra["pair_weights"] = pair_weights
    out = fn(feats.unsqueeze(-1), labels.unsqueeze(-1), *args, reduction="none", **extra, **kw)
    return out.reshape(B, P)


def _labels(B, P, C, *, ignore_frac=0.2, classes=None, gen=None, dtype=torch.int64):
    pool = torch.tensor(classes if classes is not None else list(range(C)))
    y = pool[torch.randint(0, len(pool), (B, P), generator=gen)]
    y = torch.where(torch.rand(B, P, generator=gen) < ignore_frac, IGN, y)
    return y.to(dtype)


def _compare(out, expected, grads, expected_grads, *, atol=1e-5, rtol=1e-4):
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected.double(), atol=atol, rtol=rtol)
    for g, e in zip(grads, expected_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), e.double(), atol=atol, rtol=rtol)


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


# ----------------------------------------------------------------------------------------------
# proto / dist
# ----------------------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("with_weights", [False, True])
def test_proto_matches_reference(with_weights):
    gen = torch.Generator().manual_seed(1)
    B, D, P, C = 2, 24, 37, 5
    f = torch.randn(B, D, P, generator=gen, requires_grad=True)
    # class 3 never occurs: an empty class still takes part in the denominator
    y = _labels(B, P, C, classes=[0, 1, 2, 4], gen=gen)
    mu = torch.randn(C, D, generator=gen, requires_grad=True)
    w = torch.rand(B, P, generator=gen) if with_weights else None
    out = tc.proto_contrast_per_pixel(f, y, mu, 0.5, IGN, w)
    exp = _ref_bdp(ref.proto_contrast, f, y, mu, tau=0.5, weights=w)
    assert out.dtype == torch.float32
    assert (out[y == IGN] == 0).all()
    _compare(out, exp, _grads(out, [f, mu]), _grads(exp, [f, mu]))


@interp
def test_dist_diag_matches_reference():
    gen = torch.Generator().manual_seed(2)
    B, D, P, C = 2, 24, 37, 5
    f = torch.randn(B, D, P, generator=gen, requires_grad=True)
    y = _labels(B, P, C, gen=gen, dtype=torch.uint8)
    mu = torch.randn(C, D, generator=gen, requires_grad=True)
    var = torch.rand(C, D, generator=gen).requires_grad_()
    w = torch.rand(B, P, generator=gen)
    out = tc.dist_contrast_per_pixel(f, y, mu, var, 0.7, 0.5, IGN, w)
    exp = _ref_bdp(ref.dist_contrast, f, y, mu, var, tau=0.7, lam=0.5, weights=w)
    _compare(out, exp, _grads(out, [f, mu, var]), _grads(exp, [f, mu, var]))


@interp
def test_dist_full_matches_reference():
    gen = torch.Generator().manual_seed(3)
    B, D, P, C = 2, 20, 21, 3
    f = torch.randn(B, D, P, generator=gen, requires_grad=True)
    y = _labels(B, P, C, gen=gen, dtype=torch.int32)
    mu = torch.randn(C, D, generator=gen, requires_grad=True)
    a = torch.randn(C, D, D, generator=gen) / D**0.5
    # not symmetric on purpose: the gradient must use Sigma + Sigma^T
    cov = (a @ a.transpose(1, 2) + 0.05 * torch.randn(C, D, D, generator=gen)).requires_grad_()
    out = tc.dist_contrast_per_pixel(f, y, mu, cov, 0.8, 1.0, IGN, None)
    exp = _ref_bdp(ref.dist_contrast, f, y, mu, cov, tau=0.8, lam=1.0)
    _compare(out, exp, _grads(out, [f, mu, cov]), _grads(exp, [f, mu, cov]))


@interp
def test_dist_full_equals_diag_for_a_diagonal_matrix():
    gen = torch.Generator().manual_seed(4)
    B, D, P, C = 1, 16, 19, 4
    f = torch.randn(B, D, P, generator=gen)
    y = _labels(B, P, C, gen=gen)
    mu = torch.randn(C, D, generator=gen)
    var = torch.rand(C, D, generator=gen)
    full = tc.dist_contrast_per_pixel(f, y, mu, torch.diag_embed(var), 0.5, 1.0, IGN, None)
    diag = tc.dist_contrast_per_pixel(f, y, mu, var, 0.5, 1.0, IGN, None)
    torch.testing.assert_close(full, diag, atol=1e-5, rtol=1e-5)


@interp
def test_single_class_batch():
    gen = torch.Generator().manual_seed(16)
    B, D, P, C = 1, 16, 17, 4
    f = torch.randn(B, D, P, generator=gen, requires_grad=True)
    y = torch.full((B, P), 2)
    mu = torch.randn(C, D, generator=gen, requires_grad=True)
    var = torch.rand(C, D, generator=gen)
    out = tc.dist_contrast_per_pixel(f, y, mu, var, 0.5, 1.0, IGN, None)
    exp = _ref_bdp(ref.dist_contrast, f, y, mu, var, tau=0.5, lam=1.0)
    _compare(out, exp, _grads(out, [f, mu]), _grads(exp, [f, mu]))
    # one class in total: the softmax has one entry, the loss is exactly 0
    one = tc.proto_contrast_per_pixel(f, torch.zeros_like(y), mu[:1], 0.5, IGN, None)
    assert (one == 0).all()


# ----------------------------------------------------------------------------------------------
# bank
# ----------------------------------------------------------------------------------------------
@interp
def test_bank_matches_reference():
    gen = torch.Generator().manual_seed(5)
    B, D, P, C, M = 2, 24, 37, 5, 6
    f = torch.randn(B, D, P, generator=gen, requires_grad=True)
    y = _labels(B, P, C, gen=gen)
    bank = torch.randn(C, M, D, generator=gen)
    # class 1 has no live entry: its pixels are skipped and it is nobody's negative
    bank_len = torch.tensor([6, 0, 3, 1, 5])
    out = tc.bank_contrast_per_pixel(f, y, bank, bank_len, 0.5, IGN)
    exp = _ref_bdp(ref.bank_contrast, f, y, bank, bank_len, tau=0.5)
    assert (out[y == 1] == 0).all()
    _compare(out, exp, _grads(out, [f]), _grads(exp, [f]))


@interp
def test_bank_single_live_class_has_no_negatives():
    gen = torch.Generator().manual_seed(6)
    B, D, P, C, M = 1, 16, 23, 3, 4
    f = torch.randn(B, D, P, generator=gen, requires_grad=True)
    y = _labels(B, P, C, gen=gen)
    bank = torch.randn(C, M, D, generator=gen)
    bank_len = torch.tensor([0, 4, 0])
    out = tc.bank_contrast_per_pixel(f, y, bank, bank_len, 0.3, IGN)
    exp = _ref_bdp(ref.bank_contrast, f, y, bank, bank_len, tau=0.3)
    _compare(out, exp, _grads(out, [f]), _grads(exp, [f]))


# ----------------------------------------------------------------------------------------------
# pixel-to-pixel
# ----------------------------------------------------------------------------------------------
def _pixel_case(with_weights, with_pair, C=3, seed=7, B=2, D=24, P=37, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, P, generator=gen, dtype=dtype, requires_grad=True)
    y = _labels(B, P, C, gen=gen)
    w = torch.rand(B, P, generator=gen, dtype=dtype) if with_weights else None
    a = (torch.rand(B, P, generator=gen, dtype=dtype) + 0.5).requires_grad_() if with_pair \
        else None
    return x, y, w, a


@interp
@pytest.mark.parametrize("with_weights,with_pair", [(False, False), (True, True)])
def test_pixel_matches_reference(with_weights, with_pair):
    x, y, w, a = _pixel_case(with_weights, with_pair)
    # the kernel takes normalised features; the reference normalises inside
    out = tc.pixel_contrast_per_pixel(F.normalize(x, dim=1), y, 0.5, IGN, w, a)
    exp = _ref_bdp(ref.pixel_contrast, x, y, tau=0.5, weights=w, pair_weights=a)
    inputs = [x] if a is None else [x, a]
    _compare(out, exp, _grads(out, inputs), _grads(exp, inputs))


@interp
def test_pixel_single_class_and_lonely_pixels():
    """One class (no negatives: logsumexp is -inf) plus a class with a single pixel (no
    positive: not an anchor, yet a negative of the others)."""
    B, D, P = 1, 16, 21
    x = torch.randn(B, D, P, generator=torch.Generator().manual_seed(8), requires_grad=True)
    for y in (torch.zeros(B, P, dtype=torch.long),
              torch.cat([torch.full((B, P - 1), 2), torch.full((B, 1), 0)], 1)):
        out = tc.pixel_contrast_per_pixel(F.normalize(x, dim=1), y, 0.2, IGN, None, None)
        exp = _ref_bdp(ref.pixel_contrast, x, y, tau=0.2)
        _compare(out, exp, _grads(out, [x]), _grads(exp, [x]))


# ----------------------------------------------------------------------------------------------
# shared behaviour
# ----------------------------------------------------------------------------------------------
def _all_ops(f, y, C=4, weights=None):
    D = f.shape[1]
    gen = torch.Generator().manual_seed(9)
    mu = torch.randn(C, D, generator=gen)
    var = torch.rand(C, D, generator=gen)
    bank = torch.randn(C, 3, D, generator=gen)
    return {
        "proto": lambda: tc.proto_contrast_per_pixel(f, y, mu, 0.5, IGN, weights),
        "dist": lambda: tc.dist_contrast_per_pixel(f, y, mu, var, 0.5, 1.0, IGN, weights),
        "bank": lambda: tc.bank_contrast_per_pixel(f, y, bank, torch.full((C,), 3), 0.5, IGN),
        "pixel": lambda: tc.pixel_contrast_per_pixel(f, y, 0.5, IGN, weights, None),
    }


@interp
def test_all_ignore_gives_zero_loss_and_zero_grad():
    f = torch.randn(2, 16, 9, requires_grad=True)
    y = torch.full((2, 9), IGN, dtype=torch.uint8)
    for name, run in _all_ops(f, y).items():
        out = run()
        assert (out == 0).all(), name
        (g,) = torch.autograd.grad(out.sum(), f)
        assert g.shape == f.shape and (g == 0).all(), name


@interp
def test_noncontiguous_feats():
    """Pixel-major [N, D] seen as [1, D, N] (unit stride along D) and a strided slice."""
    gen = torch.Generator().manual_seed(10)
    B, D, P, C = 2, 20, 23, 4
    base = torch.randn(B, P, 2 * D, generator=gen)
    f_pm = base[..., ::2].transpose(1, 2)  # [B, D, P], stride along D = 2, along P = 2D
    f_ct = f_pm.contiguous()
    assert not f_pm.is_contiguous()
    y = _labels(B, P, C, gen=gen)
    ops_nc, ops_ct = _all_ops(f_pm, y), _all_ops(f_ct, y)
    for name in ops_nc:
        torch.testing.assert_close(ops_nc[name](), ops_ct[name](), atol=1e-6, rtol=1e-6)
    # a strided label map and a [N, D] matrix viewed as [1, D, N]
    y_wide = torch.stack([y, y], -1)[..., 0]
    x = torch.randn(P, D, generator=gen, requires_grad=True)
    mu = torch.randn(C, D, generator=gen)
    out = tc.proto_contrast_per_pixel(x.t().unsqueeze(0), y_wide[:1], mu, 0.5, IGN, None)
    exp = ref.proto_contrast(x, y[0], mu, tau=0.5, reduction="none")
    _compare(out[0], exp, _grads(out, [x]), _grads(exp[None], [x]))


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_feats(dtype):
    gen = torch.Generator().manual_seed(11)
    B, D, P, C = 2, 16, 29, 4
    f16 = torch.randn(B, D, P, generator=gen).to(dtype).requires_grad_()
    f32 = f16.detach().float().requires_grad_()
    y = _labels(B, P, C, gen=gen)
    mu = torch.randn(C, D, generator=gen)
    var = torch.rand(C, D, generator=gen)
    tol = {"atol": 2e-2, "rtol": 2e-2}
    out = tc.dist_contrast_per_pixel(f16, y, mu, var, 0.5, 1.0, IGN, None)
    exp = _ref_bdp(ref.dist_contrast, f32, y, mu, var, tau=0.5, lam=1.0)
    assert out.dtype == torch.float32
    (g,) = _grads(out, [f16])
    assert g.dtype == dtype
    _compare(out, exp, [g], _grads(exp, [f32]), **tol)
    bank = torch.randn(C, 5, D, generator=gen)
    bank_len = torch.tensor([5, 2, 0, 4])
    out = tc.bank_contrast_per_pixel(f16, y, bank, bank_len, 0.5, IGN)
    exp = _ref_bdp(ref.bank_contrast, f32, y, bank, bank_len, tau=0.5)
    _compare(out, exp, _grads(out, [f16]), _grads(exp, [f32]), **tol)
    # pixel: normalise in fp32, hand the kernel low-precision unit vectors
    x = torch.randn(B, D, P, generator=gen, requires_grad=True)
    out = tc.pixel_contrast_per_pixel(F.normalize(x, dim=1).to(dtype), y, 0.5, IGN, None, None)
    exp = _ref_bdp(ref.pixel_contrast, x, y, tau=0.5)
    _compare(out, exp, _grads(out, [x]), _grads(exp, [x]), **tol)


@interp
def test_fp64_gradcheck():
    gen = torch.Generator().manual_seed(12)
    B, D, P, C = 1, 5, 7, 3
    f = torch.randn(B, D, P, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 1, 2, IGN, 1, 0, 1]])
    mu = torch.randn(C, D, generator=gen, dtype=torch.float64, requires_grad=True)
    var = torch.rand(C, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(B, P, generator=gen, dtype=torch.float64)
    a = (torch.rand(B, P, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    bank = torch.randn(C, 2, D, generator=gen, dtype=torch.float64)
    bank_len = torch.tensor([2, 1, 2])
    checks = [
        (lambda f, mu, var: tc.dist_contrast_per_pixel(f, y, mu, var, 0.5, 1.0, IGN, w),
         (f, mu, var)),
        (lambda f: tc.bank_contrast_per_pixel(f, y, bank, bank_len, 0.5, IGN), (f,)),
        (lambda f, a: tc.pixel_contrast_per_pixel(f, y, 0.5, IGN, w, a), (f, a)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


@interp
def test_deterministic():
    gen = torch.Generator().manual_seed(13)
    f = torch.randn(1, 16, 19, generator=gen, requires_grad=True)
    y = _labels(1, 19, 4, gen=gen)
    for name, run in _all_ops(f, y).items():
        o1, o2 = run(), run()
        (g1,), (g2,) = _grads(o1, [f]), _grads(o2, [f])
        assert torch.equal(o1, o2) and torch.equal(g1, g2), name


@interp
def test_bad_labels_and_shapes_raise():
    f = torch.randn(1, 16, 10)
    mu = torch.randn(4, 16)
    y = torch.zeros(1, 10, dtype=torch.long)
    y[0, 3] = 7
    with pytest.raises(ValueError, match="label value 7 is outside"):
        tc.proto_contrast_per_pixel(f, y, mu, 0.5, IGN, None)
    with pytest.raises(ValueError, match="label value 7 is outside"):
        tc.bank_contrast_per_pixel(f, y, torch.randn(4, 2, 16), torch.full((4,), 2), 0.5, IGN)
    y[0, 3] = -1
    with pytest.raises(ValueError, match="label value -1 is outside"):
        tc.dist_contrast_per_pixel(f, y, mu, torch.rand(4, 16), 0.5, 1.0, IGN, None)
    y[0, 3] = 0
    with pytest.raises(ValueError, match=r"centroids shape \(4, 15\).*feats shape \(1, 16, 10\)"):
        tc.proto_contrast_per_pixel(f, y, torch.randn(4, 15), 0.5, IGN, None)
    with pytest.raises(ValueError, match=r"labels shape \(1, 9\)"):
        tc.pixel_contrast_per_pixel(f, y[:, :9], 0.5, IGN, None, None)
    with pytest.raises(ValueError, match=r"covariance shape \(4, 16, 15\)"):
        tc.dist_contrast_per_pixel(f, y, mu, torch.rand(4, 16, 15), 0.5, 1.0, IGN, None)
    with pytest.raises(ValueError, match=r"bank_len shape \(3,\)"):
        tc.bank_contrast_per_pixel(f, y, torch.randn(4, 2, 16), torch.full((3,), 2), 0.5, IGN)
    with pytest.raises(TypeError, match="labels must be an integer"):
        tc.proto_contrast_per_pixel(f, y.float(), mu, 0.5, IGN, None)


@interp
def test_triton_ops_carry_the_compiled_names_and_schemas():
    """One schema list (csrc/ops_schema.h): every Triton op is torch.ops.fastuda_triton.<name>
    with exactly the schema of torch.ops.fastuda.<name>."""
    names = ("proto_contrast_forward", "proto_contrast_backward", "dist_contrast_forward",
             "dist_contrast_backward", "bank_contrast_forward", "bank_contrast_backward",
             "pixel_contrast_forward", "pixel_contrast_backward")
    for name in names:
        triton_schema = str(getattr(torch.ops.fastuda_triton, name).default._schema)
        compiled_schema = str(getattr(torch.ops.fastuda, name).default._schema)
        assert triton_schema.removeprefix("fastuda_triton::") == \
            compiled_schema.removeprefix("fastuda::"), name


@interp
def test_opcheck():
    gen = torch.Generator().manual_seed(14)
    B, D, P, C = 1, 16, 9, 3
    f = torch.randn(B, D, P, generator=gen, requires_grad=True)
    y = torch.randint(0, C, (B, P), generator=gen)
    mu = torch.randn(C, D, generator=gen, requires_grad=True)
    var = torch.rand(C, D, generator=gen)
    # the Triton ops carry the compiled ops' names and schemas (csrc/ops_schema.h)
    torch.library.opcheck(torch.ops.fastuda_triton.dist_contrast_forward.default,
                          (f, y, mu, var, 0.5, 1.0, IGN, None))
    torch.library.opcheck(torch.ops.fastuda_triton.proto_contrast_forward.default,
                          (f, y, mu, 0.5, IGN, None))
    torch.library.opcheck(torch.ops.fastuda_triton.bank_contrast_forward.default,
                          (f, y, torch.randn(C, 2, D), torch.tensor([2, 0, 1]), 0.5, IGN))
    a = torch.rand(B, P, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.fastuda_triton.pixel_contrast_forward.default,
                          (F.normalize(f.detach(), dim=1).requires_grad_(), y, 0.5, IGN, None, a))


@interp
def test_torch_compile_module():
    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Conv1d(8, 16, 1)

        def forward(self, x, y, mu):
            f = self.proj(x)
            per = tc.proto_contrast_per_pixel(f, y, mu, 0.5, IGN, None)
            per = per + tc.pixel_contrast_per_pixel(F.normalize(f, dim=1), y, 0.5, IGN, None,
                                                    None)
            return per.sum() / (y != IGN).sum().clamp_min(1)

    gen = torch.Generator().manual_seed(15)
    head = Head()
    x = torch.randn(2, 8, 11, generator=gen)
    y = _labels(2, 11, 3, gen=gen)
    mu = torch.randn(3, 16, generator=gen)
    eager = head(x, y, mu)
    (g_eager,) = torch.autograd.grad(eager, [head.proj.weight])
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    out = compiled(x, y, mu)
    (g_comp,) = torch.autograd.grad(out, [head.proj.weight])
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_comp, g_eager)


def test_interpreter_suite_in_subprocess():
    """Runs the interpreter tests in a fresh process when this one cannot (see module doc)."""
    if INTERPRETER:
        pytest.skip("the interpreter tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-m", "not cuda and not slow", __file__],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Triton's real compiler (through ptxas) accepts every kernel at the launch configurations
    a GPU run would use: catches what the interpreter cannot see (dot shapes and dtypes,
    loop-carried types). No GPU needed; runs in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastuda.ops.triton.compile_check", "--quick", "--dtype", "bf16",
         "--arch", "90"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("regs=") == 11, proc.stdout


# ----------------------------------------------------------------------------------------------
# Image-shaped cases: [B, D, H, W] conv output viewed as [B, D, H*W]; realistic sizes on CUDA
# (native kernels), small ones in the interpreter (same code)
# ----------------------------------------------------------------------------------------------
def _tol(dtype):
    if dtype == torch.float32:
        return {"atol": 2e-3, "rtol": 2e-3}
    return {"atol": 3e-2, "rtol": 3e-2}


def _check_centroid(dev, kind, dtype, B, H, W, C, D):
    gen = torch.Generator(device=dev).manual_seed(20)
    x = torch.randn(B, D, H, W, device=dev, generator=gen).to(dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    y = torch.randint(0, C, (B, H, W), device=dev, generator=gen)
    y[:, :2] = IGN
    mu = F.normalize(torch.randn(C, D, device=dev, generator=gen), dim=1).requires_grad_()
    w = torch.rand(B, H, W, device=dev, generator=gen)
    cov = None
    if kind == "diag":
        cov = (0.1 * torch.rand(C, D, device=dev, generator=gen)).requires_grad_()
    elif kind == "full":
        a = torch.randn(C, D, D, device=dev, generator=gen) / D
        cov = (a @ a.transpose(1, 2)).requires_grad_()
    f = x.view(B, D, H * W)
    if cov is None:
        out = tc.proto_contrast_per_pixel(f, y.view(B, -1), mu, 0.1, IGN, w.view(B, -1))
        exp = ref.proto_contrast(x32, y, mu, tau=0.1, weights=w, reduction="none")
        params, eparams = [x, mu], [x32, mu]
    else:
        out = tc.dist_contrast_per_pixel(f, y.view(B, -1), mu, cov, 0.1, 1.0, IGN,
                                         w.view(B, -1))
        exp = ref.dist_contrast(x32, y, mu, cov, tau=0.1, lam=1.0, weights=w, reduction="none")
        params, eparams = [x, mu, cov], [x32, mu, cov]
    g = torch.randn(B, H * W, device=dev, generator=gen)
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(exp.view(B, -1), eparams, g)
    _compare(out, exp.view(B, -1), got, want, **_tol(dtype))


def _check_bank(dev, dtype, B, H, W, C, M, D):
    gen = torch.Generator(device=dev).manual_seed(21)
    x = torch.randn(B, D, H, W, device=dev, generator=gen).to(dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    y = torch.randint(0, C, (B, H, W), device=dev, generator=gen)
    bank = F.normalize(torch.randn(C, M, D, device=dev, generator=gen), dim=2)
    bank_len = torch.randint(0, M + 1, (C,), device=dev, generator=gen)
    bank_len[1] = 0
    out = tc.bank_contrast_per_pixel(x.view(B, D, -1), y.view(B, -1), bank, bank_len, 0.1, IGN)
    exp = ref.bank_contrast(x32, y, bank, bank_len, tau=0.1, reduction="none").view(B, -1)
    g = torch.randn(B, H * W, device=dev, generator=gen)
    _compare(out, exp, torch.autograd.grad(out, [x], g), torch.autograd.grad(exp, [x32], g),
             **_tol(dtype))


def _check_pixel(dev, dtype, B, H, W, C, D):
    gen = torch.Generator(device=dev).manual_seed(22)
    x = torch.randn(B, D, H, W, device=dev, generator=gen, requires_grad=True)
    y = torch.randint(0, C, (B, H, W), device=dev, generator=gen)
    y[:, :1] = IGN
    w = torch.rand(B, H, W, device=dev, generator=gen)
    a = (torch.rand(B, H, W, device=dev, generator=gen) + 0.5).requires_grad_()
    fn = F.normalize(x, dim=1).to(dtype).view(B, D, -1)
    out = tc.pixel_contrast_per_pixel(fn, y.view(B, -1), 0.1, IGN, w.view(B, -1),
                                      a.view(B, -1))
    exp = ref.pixel_contrast(x, y, tau=0.1, weights=w, pair_weights=a,
                             reduction="none").view(B, -1)
    g = torch.randn(B, H * W, device=dev, generator=gen)
    _compare(out, exp, torch.autograd.grad(out, [x, a], g), torch.autograd.grad(exp, [x, a], g),
             **_tol(dtype))


@interp
def test_image_shaped_small():
    _check_centroid("cpu", "diag", torch.float32, 2, 5, 7, 4, 20)
    _check_bank("cpu", torch.float32, 2, 5, 7, 4, 3, 20)
    _check_pixel("cpu", torch.float16, 2, 5, 7, 3, 20)


def gpu_test(fn):
    fn = pytest.mark.cuda(fn)
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn)
    return pytest.mark.skipif(INTERPRETER, reason="triton runs in interpreter mode here")(fn)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["proto", "diag", "full"])
def test_cuda_centroid_ops(kind, dtype):
    _check_centroid("cuda", kind, dtype, 2, 128, 100, 19, 64 if kind == "full" else 256)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_bank(dtype):
    _check_bank("cuda", dtype, 2, 128, 100, 19, 200, 256)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_pixel(dtype):
    _check_pixel("cuda", dtype, 2, 65, 65, 19, 128)
