"""The CUDA kernels of csrc/cuda, executed on the CPU through the host SIMT layer.

fastuda._C_emu compiles the very op family files nvcc compiles (csrc/cuda/<f>.cu) against
csrc/common/simt_host.h and registers them as CPU ops under torch.ops.fastuda_emu with the schemas
of torch.ops.fastuda. Every test compares them with fastuda.ops.reference. Shapes are small (the
emulator runs every simulated thread on one core) but chosen so launches have several blocks and
partial tail blocks/tiles.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch

import fastuda.ops  # noqa: F401  (registers torch.ops.fastuda)
from fastuda.ops import reference as ref
from fastuda.ops._backend import as_bdp, as_bp

importlib.import_module("fastuda._C_emu")  # registers torch.ops.fastuda_emu
emu = torch.ops.fastuda_emu

LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _schema_text(op: str, namespace: str) -> str:
    schema = str(getattr(getattr(torch.ops, namespace), op).default._schema)
    return re.sub(rf"^{namespace}::", "", schema)


@pytest.mark.parametrize("op", ["class_stats", "proto_contrast_forward", "proto_contrast_backward",
                                "dist_contrast_forward", "dist_contrast_backward",
                                "bank_contrast_forward", "bank_contrast_backward",
                                "pixel_contrast_forward", "pixel_contrast_backward",
                                "downscale_labels"])
def test_emulated_schemas_match_the_real_ops(op: str) -> None:
    assert _schema_text(op, "fastuda_emu") == _schema_text(op, "fastuda")


# ----------------------------------------------------------------------------------------------
# downscale_labels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LABEL_DTYPES)
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_downscale_labels_random(dtype: torch.dtype, factor: int) -> None:
    g = torch.Generator().manual_seed(factor)
    B, H, W, C = 2, 24, 44, 5  # 2*12*22 = 528 cells at factor 2: three 256-thread blocks
    labels = torch.randint(0, C, (B, H, W), generator=g)
    # blocky regions as in real label maps, plus ignore (int8 cannot hold 255: -1 there)
    labels = labels.repeat_interleave(2, 1)[:, :H].repeat_interleave(2, 2)[:, :, :W]
    ignore = 255 if dtype != torch.int8 else -1
    labels[torch.rand(B, H, W, generator=g) < 0.15] = ignore
    labels = labels.to(dtype)
    for min_ratio in (0.0, 0.5, 0.75):
        got = emu.downscale_labels(labels, factor, C, min_ratio, ignore)
        want = ref.downscale_labels(labels, factor, num_classes=C, min_ratio=min_ratio,
                                    ignore_index=ignore)
        assert got.dtype == labels.dtype
        assert torch.equal(got, want)


def test_downscale_labels_ties_and_ratio() -> None:
    cells = torch.tensor([
        [[2, 2], [1, 1]],      # tie between classes 1 and 2 -> lowest id (1)
        [[255, 255], [3, 3]],  # tie between class 3 and ignore -> the class
        [[255, 255], [255, 0]],  # ignore wins -> ignore
        [[0, 0], [0, 4]],      # 3/4 of class 0: kept at min_ratio 0.75
    ])
    labels = torch.cat(list(cells), dim=1)[None]  # [1, 2, 8]: four 2x2 cells side by side
    got = emu.downscale_labels(labels, 2, 5, 0.5, 255)
    assert got.tolist() == [[[1, 3, 255, 0]]]
    assert emu.downscale_labels(labels, 2, 5, 0.75, 255).tolist() == [[[255, 255, 255, 0]]]
    assert emu.downscale_labels(labels, 2, 5, 0.8, 255).tolist() == [[[255, 255, 255, 255]]]


def test_downscale_labels_non_contiguous_and_all_ignore() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 3, (3, 20, 36), generator=g)
    for labels in (base.transpose(1, 2), base[:, ::2, 4:], base[::2]):
        got = emu.downscale_labels(labels, 2, 3, 0.5, 255)
        assert torch.equal(got, ref.downscale_labels(labels, 2, num_classes=3, min_ratio=0.5))
    ignore = torch.full((1, 8, 8), 255, dtype=torch.uint8)
    assert torch.equal(emu.downscale_labels(ignore, 4, 3, 0.0, 255), torch.full((1, 2, 2), 255,
                                                                                dtype=torch.uint8))
    empty = torch.zeros(0, 8, 8, dtype=torch.long)
    assert emu.downscale_labels(empty, 4, 3, 0.5, 255).shape == (0, 2, 2)


def test_downscale_labels_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by factor 3"):
        emu.downscale_labels(torch.zeros(1, 8, 8, dtype=torch.long), 3, 3, 0.5, 255)
    with pytest.raises(ValueError, match=r"must be \[B, H, W\]"):
        emu.downscale_labels(torch.zeros(8, 8, dtype=torch.long), 2, 3, 0.5, 255)
    with pytest.raises(TypeError, match="labels must be uint8"):
        emu.downscale_labels(torch.zeros(1, 8, 8), 2, 3, 0.5, 255)
    # a bad label in a cell whose vote is decided before it is read (the first three of four
    # votes are class 0) is still found
    bad = torch.zeros(1, 4, 4, dtype=torch.long)
    bad[0, 1, 1] = 7
    with pytest.raises(ValueError, match=r"label value 7 is outside \[0, 3\)"):
        emu.downscale_labels(bad, 2, 3, 0.5, 255)
    bad[0, 1, 1] = -1
    with pytest.raises(ValueError, match=r"label value -1 is outside \[0, 3\)"):
        emu.downscale_labels(bad, 2, 3, 0.5, 255)


# ----------------------------------------------------------------------------------------------
# class_stats
# ----------------------------------------------------------------------------------------------
def _bdp(feats: torch.Tensor) -> torch.Tensor:
    return as_bdp(feats)


def _bp(t: torch.Tensor | None, feats: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else as_bp(t, feats)


def _emu_class_stats(feats, labels, C, *, weights=None, cov="diag", ignore_index=255):
    w = _bp(weights, feats)
    return emu.class_stats(_bdp(feats), _bp(labels, feats), C, ignore_index,
                           None if w is None else w.float(), cov == "full")


def _assert_stats_close(got, want, atol: float, rtol: float = 1e-4) -> None:
    for name, a, b in zip(("count", "mean", "m2"), got, want, strict=True):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=rtol, msg=name)


def _image_case(seed: int, B: int = 2, D: int = 37, H: int = 9, W: int = 11, C: int = 5,
                ignore_frac: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, D, H, W, generator=g) * 2 + 1
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < ignore_frac] = 255
    return feats, labels


@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
def test_class_stats_image_layout(cov: str, weighted: bool, label_dtype: torch.dtype) -> None:
    feats, labels = _image_case(1)
    labels = labels.to(label_dtype)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)) if weighted \
        else None
    got = _emu_class_stats(feats, labels, 5, weights=weights, cov=cov)
    want = ref.class_stats(feats, labels, 5, weights=weights, cov=cov)
    _assert_stats_close(got, want, atol=1e-4)


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_class_stats_layouts(cov: str) -> None:
    feats, labels = _image_case(3, B=3, D=40, H=7, W=13, C=4)
    cases = {
        "pixel-major [N, D]": (feats.permute(0, 2, 3, 1).reshape(-1, 40), labels.reshape(-1)),
        "channels_last": (feats.contiguous(memory_format=torch.channels_last), labels),
        "sliced": (feats[:, ::2, :, 1:], labels[:, :, 1:]),
    }
    for name, (f, y) in cases.items():
        got = _emu_class_stats(f, y, 4, cov=cov)
        want = ref.class_stats(f, y, 4, cov=cov)
        _assert_stats_close(got, want, atol=1e-4)
        assert got[1].shape[-1] == f.shape[1], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_class_stats_dtypes(dtype: torch.dtype, cov: str) -> None:
    feats, labels = _image_case(4, D=33)
    feats = feats.to(dtype)
    got = _emu_class_stats(feats, labels, 5, cov=cov)
    assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = ref.class_stats(feats.to(torch.float64), labels, 5, cov=cov)  # same values, upcast
    _assert_stats_close(got, want, atol=1e-9 if dtype == torch.float64 else 1e-4,
                        rtol=1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_class_stats_edge_cases(cov: str) -> None:
    feats, labels = _image_case(5, C=6)
    # empty classes (3 and 5 never appear)
    sparse = torch.where((labels == 3) | (labels == 5), 0, labels)
    _assert_stats_close(_emu_class_stats(feats, sparse, 6, cov=cov),
                        ref.class_stats(feats, sparse, 6, cov=cov), atol=1e-4)
    # a single class
    one = torch.where(labels == 255, 255, 2)
    _assert_stats_close(_emu_class_stats(feats, one, 6, cov=cov),
                        ref.class_stats(feats, one, 6, cov=cov), atol=1e-4)
    # everything ignored: zeros
    none = torch.full_like(labels, 255)
    for t in _emu_class_stats(feats, none, 6, cov=cov):
        assert not t.any()
    # no pixels at all
    count, mean, m2 = _emu_class_stats(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 3,
                                       cov=cov)
    assert not count.any() and mean.shape == (3, 8) and not m2.any()


def test_class_stats_many_classes_split_over_blocks() -> None:
    # 400 classes do not fit one block's shared memory: classes are split over grid.z
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(700, 34, generator=g)
    labels = torch.randint(0, 400, (700,), generator=g)
    for cov in ("diag", "full"):
        _assert_stats_close(_emu_class_stats(feats, labels, 400, cov=cov),
                            ref.class_stats(feats, labels, 400, cov=cov), atol=1e-4)


def test_class_stats_large_offset_no_cancellation() -> None:
    # m2 from centred values: a mean of 1e4 with unit spread keeps its variance in fp32
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(500, 4, generator=g, dtype=torch.float64) + 1e4
    labels = torch.randint(0, 2, (500,), generator=g)
    got = _emu_class_stats(feats.float(), labels, 2)
    want = ref.class_stats(feats, labels, 2)
    torch.testing.assert_close(got[2].double(), want.m2, rtol=2e-3, atol=0)


def test_class_stats_deterministic_and_bad_labels() -> None:
    feats, labels = _image_case(8)
    first = _emu_class_stats(feats, labels, 5, cov="full")
    second = _emu_class_stats(feats, labels, 5, cov="full")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    bad = labels.clone()
    bad[1, 4, 5] = 7
    with pytest.raises(ValueError, match=r"label value 7 is outside \[0, 5\)"):
        _emu_class_stats(feats, bad, 5)
    with pytest.raises(ValueError, match="does not match feats shape"):
        emu.class_stats(_bdp(feats), labels.reshape(2, -1)[:, 1:], 5, 255, None, False)
    with pytest.raises(TypeError, match="labels must be uint8"):
        emu.class_stats(_bdp(feats), labels.reshape(2, -1).float(), 5, 255, None, False)


# ----------------------------------------------------------------------------------------------
# proto_contrast / dist_contrast
# ----------------------------------------------------------------------------------------------
def _grad_to_input_layout(grad_bdp: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """The kernels' [B, D, P] gradient in the layout of the feats passed by the user."""
    if feats.dim() == 2:
        return grad_bdp[0].t()
    return grad_bdp.reshape(feats.shape)


def _contrast_case(seed: int, *, C: int = 5, D: int = 37, B: int = 2, H: int = 9, W: int = 11,
                   cov: str | None = None, weighted: bool = False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = (torch.randn(B, D, H, W, generator=g) / D ** 0.5).to(dtype)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < 0.2] = 255
    centroids = torch.randn(C, D, generator=g) / D ** 0.5
    covariance = None
    if cov == "diag":
        covariance = torch.rand(C, D, generator=g) * 0.5
    elif cov == "full":
        a = torch.randn(C, D, D, generator=g) / D
        covariance = a @ a.transpose(1, 2) + 0.1 * torch.randn(C, D, D, generator=g) / D
    weights = torch.rand(B, H, W, generator=g) if weighted else None
    return feats, labels, centroids, covariance, weights


def _emu_forward(feats, labels, centroids, covariance, weights, tau, lam):
    w = _bp(weights, feats)
    if covariance is None:
        return emu.proto_contrast_forward(_bdp(feats), _bp(labels, feats), centroids, tau, 255,
                                          w)[:2]
    return emu.dist_contrast_forward(_bdp(feats), _bp(labels, feats), centroids, covariance, tau,
                                     lam, 255, w)[:2]


def _emu_backward(grad_loss, feats, labels, centroids, covariance, weights, lse, tau, lam,
                  stats_grad=True):
    w = _bp(weights, feats)
    if covariance is None:
        gf, gc = emu.proto_contrast_backward(grad_loss, _bdp(feats), _bp(labels, feats),
                                             centroids, lse, tau, 255, w, stats_grad)
        return gf, gc, None
    return emu.dist_contrast_backward(grad_loss, _bdp(feats), _bp(labels, feats), centroids,
                                      covariance, lse, tau, lam, 255, w, stats_grad)


def _reference_per_pixel(feats, labels, centroids, covariance, weights, tau, lam):
    out = ref.dist_contrast(feats, labels, centroids, covariance, tau=tau, lam=lam,
                            weights=weights, reduction="none")
    return as_bp(out, feats)


def _check_contrast(feats, labels, centroids, covariance, weights, *, tau=0.3, lam=0.7,
                    atol=1e-5, rtol=1e-4, seed=0):
    loss, lse = _emu_forward(feats, labels, centroids, covariance, weights, tau, lam)
    # reference in fp64 on the same values, with autograd for the gradients
    f64 = feats.detach().double().requires_grad_()
    c64 = centroids.detach().double().requires_grad_()
    s64 = None if covariance is None else covariance.detach().double().requires_grad_()
    want = _reference_per_pixel(f64, labels, c64, s64, weights, tau, lam)
    torch.testing.assert_close(loss.double(), want.detach(), atol=atol, rtol=rtol)
    grad_loss = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    grads = torch.autograd.grad((want * grad_loss.double()).sum(),
                                [f64, c64] + ([s64] if s64 is not None else []),
                                allow_unused=True)
    gf, gc, gs = _emu_backward(grad_loss, feats, labels, centroids, covariance, weights, lse,
                               tau, lam)
    assert gf.dtype == feats.dtype and gf.shape == _bdp(feats).shape and gf.is_contiguous()
    torch.testing.assert_close(_grad_to_input_layout(gf, feats).double(), grads[0], atol=atol,
                               rtol=rtol)
    torch.testing.assert_close(gc.double(), grads[1], atol=atol, rtol=rtol)
    if covariance is not None:
        torch.testing.assert_close(gs.double(), grads[2], atol=atol, rtol=rtol)
    return loss, lse


@pytest.mark.parametrize("cov", [None, "diag", "full"])
@pytest.mark.parametrize("weighted", [False, True])
def test_contrast_image_layout(cov: str | None, weighted: bool) -> None:
    # 198 pixels: two 128-pixel blocks / four 64-pixel tiles, the last ones partial
    _check_contrast(*_contrast_case(10, cov=cov, weighted=weighted))


@pytest.mark.parametrize("cov", [None, "diag", "full"])
def test_contrast_layouts_and_label_dtypes(cov: str | None) -> None:
    feats, labels, centroids, covariance, _ = _contrast_case(11, cov=cov, D=40, C=4)
    _check_contrast(feats.permute(0, 2, 3, 1).reshape(-1, 40), labels.reshape(-1).to(torch.int32),
                    centroids, covariance, None)
    _check_contrast(feats.contiguous(memory_format=torch.channels_last), labels.to(torch.uint8),
                    centroids, covariance, None)
    _check_contrast(feats[:, :, 1:, ::2], labels[:, 1:, ::2], centroids, covariance, None)


@pytest.mark.parametrize("cov", [None, "diag"])
def test_contrast_many_classes(cov: str | None) -> None:
    # 45 classes: two 32-class register chunks with an online logsumexp across them
    _check_contrast(*_contrast_case(12, cov=cov, C=45, D=70))


def test_contrast_full_covariance_several_channel_tiles() -> None:
    # D = 70: three 32-channel slices in both operands of F S_c
    _check_contrast(*_contrast_case(13, cov="full", C=3, D=70, B=1, H=5, W=17), atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cov", [None, "diag", "full"])
def test_contrast_low_precision_feats(dtype: torch.dtype, cov: str | None) -> None:
    feats, labels, centroids, covariance, weights = _contrast_case(14, cov=cov, dtype=dtype)
    # the reference runs on the same (rounded) values upcast; the gradient is rounded to dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    _check_contrast(feats, labels, centroids, covariance, weights, atol=tol, rtol=tol)


@pytest.mark.parametrize("cov", [None, "diag", "full"])
def test_contrast_edge_cases(cov: str | None) -> None:
    feats, labels, centroids, covariance, _ = _contrast_case(15, cov=cov, C=4)
    # one class present, two classes empty
    one = torch.where(labels == 255, 255, 1)
    _check_contrast(feats, one, centroids, covariance, None)
    # a single class overall (C = 1): loss 0 everywhere, gradients 0
    c1 = centroids[:1]
    s1 = None if covariance is None else covariance[:1]
    _check_contrast(feats, torch.where(labels == 255, 255, 0), c1, s1, None)
    # everything ignored: zeros, never NaN
    none = torch.full_like(labels, 255)
    loss, lse = _check_contrast(feats, none, centroids, covariance, None)
    assert not loss.any()


@pytest.mark.parametrize("cov", [None, "diag", "full"])
def test_contrast_fp64_gradcheck(cov: str | None) -> None:
    feats, labels, centroids, covariance, weights = _contrast_case(16, cov=cov, C=3, D=5, B=1,
                                                                   H=2, W=5, weighted=True)
    tau, lam = 0.5, 0.8

    class EmuContrast(torch.autograd.Function):
        @staticmethod
        def forward(ctx, f, c, s):
            loss, lse = _emu_forward(f, labels, c, s, weights, tau, lam)
            ctx.save_for_backward(f, c, s, lse)
            return loss

        @staticmethod
        def backward(ctx, grad):
            f, c, s, lse = ctx.saved_tensors
            gf, gc, gs = _emu_backward(grad.contiguous(), f, labels, c, s, weights, lse, tau, lam)
            return _grad_to_input_layout(gf, f), gc, gs

    inputs = (feats.double().requires_grad_(), centroids.double().requires_grad_(),
              None if covariance is None else covariance.double().requires_grad_())
    # fast mode (random directional derivatives) keeps the number of emulated launches small
    assert torch.autograd.gradcheck(EmuContrast.apply, inputs, eps=1e-6, atol=1e-7,
                                    fast_mode=True)


def test_contrast_backward_without_stats_grad_and_errors() -> None:
    feats, labels, centroids, covariance, _ = _contrast_case(17, cov="diag")
    loss, lse = _emu_forward(feats, labels, centroids, covariance, None, 0.3, 1.0)
    gf, gc, gs = _emu_backward(torch.ones_like(loss), feats, labels, centroids, covariance, None,
                               lse, 0.3, 1.0, stats_grad=False)
    assert gc.numel() == 0 and gs.numel() == 0 and gf.shape == _bdp(feats).shape
    bad = labels.clone()
    bad[0, 2, 3] = 9
    with pytest.raises(ValueError, match=r"label value 9 is outside \[0, 5\)"):
        _emu_forward(feats, bad, centroids, covariance, None, 0.3, 1.0)
    with pytest.raises(ValueError, match="does not match the feature width"):
        _emu_forward(feats, labels, centroids[:, 1:], None, None, 0.3, 1.0)
    with pytest.raises(ValueError, match="covariance shape"):
        _emu_forward(feats, labels, centroids, covariance[:, 1:], None, 0.3, 1.0)


# ----------------------------------------------------------------------------------------------
# bank_contrast
# ----------------------------------------------------------------------------------------------
def _bank_case(seed: int, *, C: int = 5, M: int = 4, D: int = 37, B: int = 2, H: int = 9,
               W: int = 11, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = (torch.randn(B, D, H, W, generator=g) / D ** 0.5).to(dtype)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < 0.2] = 255
    bank = torch.randn(C, M, D, generator=g) / D ** 0.5
    bank_len = torch.randint(0, M + 1, (C,), generator=g)
    bank_len[0], bank_len[1] = M, 0  # a full class and a class without entries
    return feats, labels, bank, bank_len


def _check_bank(feats, labels, bank, bank_len, *, tau=0.2, atol=1e-5, rtol=1e-4, seed=0):
    bdp, y = _bdp(feats), _bp(labels, feats)
    loss, neg_lse = emu.bank_contrast_forward(bdp, y, bank, bank_len, tau, 255)
    f64 = feats.detach().double().requires_grad_()
    want = as_bp(ref.bank_contrast(f64, labels, bank.double(), bank_len, tau=tau,
                                   reduction="none"), feats)
    torch.testing.assert_close(loss.double(), want.detach(), atol=atol, rtol=rtol)
    grad_loss = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    (want_grad,) = torch.autograd.grad((want * grad_loss.double()).sum(), [f64])
    gf = emu.bank_contrast_backward(grad_loss, bdp, y, bank, bank_len, neg_lse, tau, 255)
    assert gf.dtype == feats.dtype and gf.shape == bdp.shape
    torch.testing.assert_close(_grad_to_input_layout(gf, feats).double(), want_grad, atol=atol,
                               rtol=rtol)
    return loss


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int64])
def test_bank_contrast_image_layout(label_dtype: torch.dtype) -> None:
    feats, labels, bank, bank_len = _bank_case(20)
    _check_bank(feats, labels.to(label_dtype), bank, bank_len)


def test_bank_contrast_layouts_and_sizes() -> None:
    feats, labels, bank, bank_len = _bank_case(21, C=4, M=3, D=40)
    _check_bank(feats.permute(0, 2, 3, 1).reshape(-1, 40), labels.reshape(-1), bank, bank_len)
    _check_bank(feats.contiguous(memory_format=torch.channels_last), labels, bank, bank_len)
    # 40 bank entries (two 32-entry chunks) and 35 classes (two 32-class chunks)
    _check_bank(*_bank_case(22, C=35, M=40, D=20, H=5, W=7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bank_contrast_low_precision_feats(dtype: torch.dtype) -> None:
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    _check_bank(*_bank_case(23, dtype=dtype), atol=tol, rtol=tol)


def test_bank_contrast_edge_cases() -> None:
    feats, labels, bank, bank_len = _bank_case(24, C=3)
    # only one class has entries: no negatives anywhere, loss 0 and no NaN
    lens = torch.tensor([2, 0, 0])
    loss = _check_bank(feats, labels, bank, lens)
    assert not loss.any()
    # every pixel of a class without entries is skipped; all-ignore gives zeros
    _check_bank(feats, torch.where(labels == 255, 255, 1), bank, bank_len)
    assert not _check_bank(feats, torch.full_like(labels, 255), bank, bank_len).any()


def test_bank_contrast_fp64_and_errors() -> None:
    feats, labels, bank, bank_len = _bank_case(25, D=6, H=3, W=5)
    _check_bank(feats.double(), labels, bank.double(), bank_len, atol=1e-10, rtol=1e-9)
    bdp, y = _bdp(feats), _bp(labels, feats)
    bad = y.clone()
    bad[0, 3] = 11
    with pytest.raises(ValueError, match=r"label value 11 is outside \[0, 5\)"):
        emu.bank_contrast_forward(bdp, bad, bank, bank_len, 0.2, 255)
    with pytest.raises(ValueError, match=r"bank_len\[2\] = 9 is outside \[0, 4\]"):
        emu.bank_contrast_forward(bdp, y, bank, torch.tensor([1, 1, 9, 0, 0]), 0.2, 255)
    with pytest.raises(ValueError, match="bank shape"):
        emu.bank_contrast_forward(bdp, y, bank[:, :, 1:], bank_len, 0.2, 255)


# ----------------------------------------------------------------------------------------------
# the emulator itself
# ----------------------------------------------------------------------------------------------
def test_simt_emulator_runs_correct_cuda_code() -> None:
    g = torch.Generator().manual_seed(30)
    threads, blocks = 256, 3
    values = torch.randint(0, 6, (blocks * threads,), generator=g).float()
    out = emu.simt_selftest(0, threads, values)[:4 * blocks].reshape(4, blocks)
    per_block = values.reshape(blocks, threads)
    torch.testing.assert_close(out[0], per_block.sum(1))  # shared-memory tree + __syncthreads
    torch.testing.assert_close(out[1], per_block.sum(1))  # __shfl_xor_sync
    warps = per_block.reshape(blocks, threads // 32, 32)
    distinct = torch.tensor([[len(set(w.tolist())) for w in b] for b in warps]).sum(1)
    assert out[2].tolist() == distinct.float().tolist()  # __match_any_sync + __ballot_sync
    assert out[3].tolist() == (per_block % 2 == 1).sum(1).float().tolist()


def test_simt_emulator_exposes_a_missing_syncthreads() -> None:
    values = torch.arange(256, dtype=torch.float32)
    out = emu.simt_selftest(1, 256, values)
    assert out[0] != values.sum()  # the racy tree reduction reads stale shared memory


def test_simt_emulator_rejects_undefined_behaviour() -> None:
    with pytest.raises(RuntimeError, match="deadlock.*1 of 64 threads returned"):
        emu.simt_selftest(2, 64, torch.zeros(64))
    with pytest.raises(RuntimeError, match="partial lane mask"):
        emu.simt_selftest(3, 32, torch.zeros(32))
    with pytest.raises(RuntimeError, match="invalid launch configuration"):
        emu.simt_selftest(4, 32, torch.zeros(32))
