"""The CUDA pixel_contrast kernels (csrc/cuda/pixel_contrast.cu) executed on the CPU through
the host SIMT layer (torch.ops.fastuda_emu), against fastuda.ops.reference.

The emulated forward gets the autograd of the real op (fastuda.ops.pixel_contrast.make_backward
with the emulated backward), so the losses, the feature gradients (through the L2 normalisation,
as in fastuda.ops.pixel_contrast) and the pair-weight gradients are compared with the reference's
autograd. The auxiliary outputs (neg_lse, pos_acc, n_pos) are checked against a dense fp64
evaluation of their definitions. Sizes are small but give partial row blocks (32 anchors),
several partial column tiles (64 pixels), partial 32-channel stages and several 32-channel
gradient slices (the emulation's grid.y split).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastuda.ops  # noqa: F401  (registers torch.ops.fastuda)
from fastuda.ops import reference as ref
from fastuda.ops._backend import as_bdp, as_bp

importlib.import_module("fastuda._C_emu")  # registers torch.ops.fastuda_emu
# the module (fastuda.ops.pixel_contrast is also the name of the function it exports)
pixel_module = importlib.import_module("fastuda.ops.pixel_contrast")
emu = torch.ops.fastuda_emu
torch.library.register_autograd(
    "fastuda_emu::pixel_contrast_forward",
    pixel_module.make_backward(lambda *args: emu.pixel_contrast_backward(*args)),
    setup_context=pixel_module._setup_context)

TAU = 0.3


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _kernel_layout(unit_bdp: torch.Tensor, layout: str) -> torch.Tensor:
    """The [B, D, P] unit features in the memory layout the kernel is to read (differentiable)."""
    if layout == "contiguous":
        return unit_bdp
    if layout == "pixel_major":  # what an [N, D] or channels-last input looks like as [B, D, P]
        return unit_bdp.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":  # every other channel and an offset pixel range of a larger buffer
        B, D, P = unit_bdp.shape
        buf = unit_bdp.new_zeros(B, 2 * D, P + 3)
        buf[:, ::2, 3:] = unit_bdp
        return buf[:, ::2, 3:]
    raise ValueError(layout)


def _emu_per_pixel(feats: torch.Tensor, labels: torch.Tensor, *, dtype: torch.dtype | None = None,
                   layout: str = "contiguous", weights: torch.Tensor | None = None,
                   pair: torch.Tensor | None = None, tau: float = TAU,
                   ignore_index: int = 255) -> tuple[torch.Tensor, ...]:
    """The emulated op on user-layout feats, normalised as fastuda.ops.pixel_contrast does (in
    fp64 here, then cast to the kernel's input dtype). Returns the four forward outputs."""
    dtype = dtype or feats.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    unit = F.normalize(as_bdp(feats).double(), dim=1).to(dtype)
    x = _kernel_layout(unit, layout)
    if layout != "contiguous":
        assert not x.is_contiguous()
    w = None if weights is None else as_bp(weights, feats).to(acc)
    a = None if pair is None else as_bp(pair, feats).to(acc)
    return emu.pixel_contrast_forward(x, as_bp(labels, feats), tau, ignore_index, w, a)


def _dense_aux(feats: torch.Tensor, labels: torch.Tensor, pair: torch.Tensor | None, tau: float,
               ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """neg_lse, pos_acc, n_pos [B, P] from their definitions, on the dense fp64 N x N matrix
    (0 at ignored pixels; neg_lse = -inf for anchors without a negative)."""
    f, y, _ = ref.flatten_pixels(feats.detach(), labels)
    u = F.normalize(f.double(), dim=1)
    s = u @ u.t() / tau
    valid = y != ignore_index
    both = valid[:, None] & valid[None, :]
    same = (y[:, None] == y[None, :]) & both & ~torch.eye(len(y), dtype=torch.bool)
    neg = (y[:, None] != y[None, :]) & both
    nu = torch.logsumexp(s.masked_fill(~neg, float("-inf")), dim=1)
    a = torch.ones(len(y), dtype=torch.float64) if pair is None else \
        pair.detach().reshape(-1).double()
    sig = torch.where(same, torch.sigmoid(nu[:, None] - s), 0.0)
    pos_acc = (sig * a[:, None] * a[None, :]).sum(1)
    n_pos = same.sum(1).double()
    zero = torch.zeros_like(nu)
    shape = as_bp(labels, feats).shape
    return (torch.where(valid, nu, zero).reshape(shape),
            torch.where(valid, pos_acc, zero).reshape(shape), n_pos.reshape(shape))


def _check(feats: torch.Tensor, labels: torch.Tensor, *, dtype: torch.dtype | None = None,
           layout: str = "contiguous", weights: torch.Tensor | None = None,
           pair: torch.Tensor | None = None, tau: float = TAU, ignore_index: int = 255,
           tol: float = 1e-5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Emulated forward + backward vs the reference (fp64, autograd) on the same feats."""
    f_emu = feats.detach().double().requires_grad_()
    a_emu = None if pair is None else pair.detach().double().requires_grad_()
    loss, neg_lse, pos_acc, n_pos = _emu_per_pixel(f_emu, labels, dtype=dtype or feats.dtype,
                                                   layout=layout, weights=weights, pair=a_emu,
                                                   tau=tau, ignore_index=ignore_index)
    f_ref = feats.detach().double().requires_grad_()
    a_ref = None if pair is None else pair.detach().double().requires_grad_()
    want = as_bp(ref.pixel_contrast(f_ref, labels, tau=tau, weights=weights, pair_weights=a_ref,
                                    ignore_index=ignore_index, reduction="none"), feats)
    torch.testing.assert_close(loss.double(), want.detach(), atol=tol, rtol=tol)
    # the auxiliary outputs the backward consumes
    want_nu, want_acc, want_npos = _dense_aux(feats, labels, pair, tau, ignore_index)
    assert torch.equal(n_pos.double(), want_npos)
    assert torch.equal(neg_lse.isneginf(), want_nu.isneginf())
    finite = want_nu.isfinite()
    torch.testing.assert_close(neg_lse.double()[finite], want_nu[finite], atol=tol, rtol=tol)
    torch.testing.assert_close(pos_acc.double(), want_acc, atol=tol, rtol=tol)
    # gradients through the normalisation, for a non-uniform upstream gradient
    scale = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    (loss.double() * scale.double()).sum().backward()
    (want * scale.double()).sum().backward()
    gtol = tol * 10
    torch.testing.assert_close(f_emu.grad, f_ref.grad, atol=gtol, rtol=gtol)
    if pair is not None:
        torch.testing.assert_close(a_emu.grad, a_ref.grad, atol=gtol, rtol=gtol)
    return loss, neg_lse, pos_acc, n_pos


def _case(seed: int, *, B: int = 2, D: int = 37, H: int = 9, W: int = 11, C: int = 4,
          ignore_frac: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, D, H, W, generator=g)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < ignore_frac] = 255
    labels.view(-1)[5] = C  # a class with one pixel: an anchor without a positive
    pair = 0.2 + torch.rand(B, H, W, generator=g)
    weights = 0.1 + torch.rand(B, H, W, generator=g)
    return feats, labels, pair, weights


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("paired", [False, True])
def test_image_layout_weights_and_pair_weights(weighted: bool, paired: bool) -> None:
    # 198 pixels: 7 row blocks (the last partial) x 4 column tiles (the last partial); D = 37:
    # two channel stages and two gradient slices, both partial
    feats, labels, pair, weights = _case(1)
    loss, *_ = _check(feats, labels, weights=weights if weighted else None,
                      pair=pair if paired else None)
    assert loss[as_bp(labels, feats) == 255].eq(0).all()


@pytest.mark.parametrize("layout", ["pixel_major", "sliced"])
def test_strided_kernel_inputs(layout: str) -> None:
    feats, labels, pair, _ = _case(2, D=40)
    _check(feats, labels, layout=layout, pair=pair)


def test_pixel_major_and_channels_last_user_inputs() -> None:
    feats, labels, pair, weights = _case(3, B=1, D=20, H=7, W=23)
    nd = feats[0].permute(1, 2, 0).reshape(-1, 20)  # [N, D]
    _check(nd, labels.reshape(-1), pair=pair.reshape(-1), weights=weights.reshape(-1),
           layout="pixel_major")
    _check(feats.contiguous(memory_format=torch.channels_last), labels, pair=pair)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32,
                                         torch.int64])
def test_label_dtypes(label_dtype: torch.dtype) -> None:
    feats, labels, pair, _ = _case(4, B=1, H=8, W=13)
    ignore = 255
    if label_dtype == torch.int8:  # int8 cannot hold 255
        labels = torch.where(labels == 255, -1, labels)
        ignore = -1
    _check(feats, labels.to(label_dtype), pair=pair, ignore_index=ignore)


def test_any_label_value_is_a_class() -> None:
    """As in the CPU kernel and the reference, any label other than ignore_index is a class:
    negative and large values are classes, not errors."""
    feats, labels, pair, _ = _case(5, B=1, H=6, W=17)
    labels = labels * 100_000 - 7  # classes -7, 99993, ...; ignored pixels become 25499993
    labels.view(-1)[::9] = -3
    _check(feats, labels, pair=pair, ignore_index=-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_feature_dtypes(dtype: torch.dtype) -> None:
    feats, labels, pair, weights = _case(6, D=33)
    # fp16/bf16: the kernel reads the unit features rounded to dtype, the reference the exact ones
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float64: 1e-10}[dtype]
    loss, *_ = _check(feats, labels, dtype=dtype, pair=pair, weights=weights, tol=tol)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_gradient_dtype_layout_and_channel_slices() -> None:
    # D = 70: three 32-channel stages and three gradient slices (grid.y), the last of 6 channels
    feats, labels, pair, _ = _case(7, B=1, D=70, H=5, W=19)
    _check(feats, labels, pair=pair)
    unit = F.normalize(as_bdp(feats), dim=1).half()
    y = as_bp(labels, feats)
    loss, nu, acc, _ = emu.pixel_contrast_forward(unit, y, TAU, 255, None, None)
    gf, gp = emu.pixel_contrast_backward(torch.ones_like(loss), unit, y, nu, acc, TAU, 255, None,
                                         None)
    assert gf.dtype == torch.float16 and gf.shape == unit.shape and gf.is_contiguous()
    assert gp.numel() == 0
    gf, gp = emu.pixel_contrast_backward(torch.ones_like(loss), unit, y, nu, acc, TAU, 255, None,
                                         torch.ones(y.shape, dtype=torch.float16))
    assert gp.dtype == torch.float16 and gp.shape == y.shape  # the pair weights' own dtype


def test_tile_skipping_keeps_every_pair() -> None:
    """Class-sorted labels with a whole ignored tile: column tiles that are all of the rows' class
    (skipped in the pass over negatives), all ignored (skipped everywhere) or of other classes
    (skipped in the pass over positives), next to mixed tiles."""
    g = torch.Generator().manual_seed(8)
    feats = torch.randn(300, 12, generator=g)
    labels = torch.cat([torch.zeros(100), torch.full((70,), 255), torch.ones(64),
                        torch.randint(1, 4, (66,), generator=g)]).long()
    _check(feats, labels, pair=0.3 + torch.rand(300, generator=g), layout="pixel_major")


@pytest.mark.parametrize("case", ["all_ignore", "single_class", "no_positive"])
def test_degenerate_batches(case: str) -> None:
    feats, labels, pair, weights = _case(9, B=1, H=5, W=14)
    labels = {"all_ignore": torch.full_like(labels, 255),
              "single_class": torch.where(labels == 255, 255, 2),
              "no_positive": torch.arange(labels.numel()).reshape(labels.shape)}[case]
    f = feats.double().requires_grad_()
    a = pair.double().requires_grad_()
    loss, neg_lse, pos_acc, n_pos = _emu_per_pixel(f, labels, weights=weights, pair=a)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(pos_acc, torch.zeros_like(pos_acc))
    valid = as_bp(labels, feats) != 255
    if case == "single_class":  # no negatives: neg_lse = -inf at the valid pixels, as on the CPU
        assert neg_lse[valid].isneginf().all() and n_pos[valid].gt(0).all()
    else:
        assert torch.equal(n_pos, torch.zeros_like(n_pos))
    loss.sum().backward()
    assert torch.equal(f.grad, torch.zeros_like(f.grad))
    assert torch.equal(a.grad, torch.zeros_like(a.grad))
    _check(feats, labels, pair=pair, weights=weights)  # and the reference agrees (no NaN)


def test_matches_the_cpu_kernel_and_is_deterministic() -> None:
    feats, labels, pair, weights = _case(10)
    unit = F.normalize(as_bdp(feats), dim=1)
    y, a, w = as_bp(labels, feats), as_bp(pair, feats), as_bp(weights, feats)
    args = (unit, y, TAU, 255, w, a)
    out = emu.pixel_contrast_forward(*args)
    cpu = torch.ops.fastuda.pixel_contrast_forward(*args)
    for got, want in zip(out, cpu, strict=True):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    grad = torch.rand(y.shape, generator=torch.Generator().manual_seed(11))
    bwd = emu.pixel_contrast_backward(grad, unit, y, out[1], out[2], TAU, 255, w, a)
    bwd_cpu = torch.ops.fastuda.pixel_contrast_backward(grad, unit, y, cpu[1], cpu[2], TAU, 255,
                                                        w, a)
    for got, want in zip(bwd, bwd_cpu, strict=True):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    again = emu.pixel_contrast_forward(*args)
    bwd_again = emu.pixel_contrast_backward(grad, unit, y, again[1], again[2], TAU, 255, w, a)
    for first, second in zip((*out, *bwd), (*again, *bwd_again), strict=True):
        assert torch.equal(first, second)  # no floating-point atomics: bitwise reproducible


def test_fp64_gradcheck_through_the_op_autograd() -> None:
    g = torch.Generator().manual_seed(12)
    feats = torch.randn(13, 4, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 255, 1, 0, 2, 2, 1, 0, 255, 3])  # class 3: no positive
    pair = (0.2 + torch.rand(13, generator=g, dtype=torch.float64)).requires_grad_()
    weights = 0.2 + torch.rand(1, 13, generator=g, dtype=torch.float64)

    def per_pixel(f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(as_bdp(f), dim=1)
        return emu.pixel_contrast_forward(unit, labels[None], 0.5, 255, weights, a[None])[0]

    assert torch.autograd.gradcheck(per_pixel, (feats, pair), eps=1e-6, atol=1e-7)


def test_errors() -> None:
    feats, labels, _, _ = _case(13, B=1, H=3, W=4)
    x, y = F.normalize(as_bdp(feats), dim=1), as_bp(labels, feats)
    with pytest.raises(ValueError, match=r"pixel_contrast_forward: labels shape \[1, 11\] does "
                                         "not match feats shape"):
        emu.pixel_contrast_forward(x, y[:, 1:], TAU, 255, None, None)
    with pytest.raises(TypeError, match="labels must be uint8, int8, int16, int32 or int64"):
        emu.pixel_contrast_forward(x, y.float(), TAU, 255, None, None)
    with pytest.raises(ValueError, match=r"pair_weights shape \[1, 11\] does not match labels"):
        emu.pixel_contrast_forward(x, y, TAU, 255, None, torch.ones(1, 11))
    with pytest.raises(TypeError, match="weights must be floating point"):
        emu.pixel_contrast_forward(x, y, TAU, 255, torch.ones(y.shape, dtype=torch.long), None)
    with pytest.raises(ValueError, match="tau must be > 0"):
        emu.pixel_contrast_forward(x, y, 0.0, 255, None, None)
    with pytest.raises(TypeError, match="feats must be float32, float16, bfloat16 or float64"):
        emu.pixel_contrast_forward(x.to(torch.int32), y, TAU, 255, None, None)
    loss, nu, acc, _ = emu.pixel_contrast_forward(x, y, TAU, 255, None, None)
    with pytest.raises(ValueError, match=r"pixel_contrast_backward: neg_lse shape \[12\]"):
        emu.pixel_contrast_backward(loss, x, y, nu.reshape(-1), acc, TAU, 255, None, None)
    empty = emu.pixel_contrast_forward(x[:, :, :0], y[:, :0], TAU, 255, None, None)
    assert all(t.shape == (1, 0) for t in empty)


def _signed_pair(seed: int, B: int, H: int, W: int) -> torch.Tensor:
    """u = q r a as CLUDA's multi-resolution weighting sends it: r = -1 on the detail pixels (the
    second half of the batch, and a few scattered pixels), so about half the weights are < 0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, H, W, generator=g)
    q = 0.1 + torch.rand(B, H, W, generator=g)
    r = torch.ones(B, H, W)
    r[B // 2:] = -1
    r[torch.rand(B, H, W, generator=g) < 0.1] *= -1
    return q * r * a


def test_negative_pair_weights_match_the_reference() -> None:
    """Signed pair weights (w_ip = u_i u_p < 0 across views): losses, auxiliary outputs, feature
    and pair-weight gradients against the reference."""
    feats, labels, _, weights = _case(14, B=4, H=5, W=9)
    pair = _signed_pair(15, 4, 5, 9)
    assert pair.lt(0).any() and pair.gt(0).any()
    for w in (None, weights):
        _check(feats, labels, dtype=torch.float64, pair=pair, weights=w, tol=1e-9, seed=16)
    _check(feats, labels, dtype=torch.float32, pair=pair, tol=1e-5, seed=17)


@pytest.mark.parametrize("with_q", [False, True])
def test_multires_three_calls_through_the_emulated_op(monkeypatch: pytest.MonkeyPatch,
                                                      with_q: bool) -> None:
    """CLUDA's multi-resolution weighting (three pixel_contrast calls, the first with u = q r a,
    the third with u = q r: negative weights on the detail pixels) through the public op with its
    kernel forward replaced by the emulated CUDA kernels, against the torch reference: loss and
    the gradients of the features and of a."""
    from fastuda.methods.cluda import multires_pair_contrast

    calls: list[int] = []

    def emulated_forward(*args):
        calls.append(1)
        return emu.pixel_contrast_forward(*args)

    monkeypatch.setattr(torch.ops.fastuda, "pixel_contrast_forward", emulated_forward)
    g = torch.Generator().manual_seed(18)
    B, D, H, W = 4, 37, 6, 7  # 2 context + 2 detail images: 168 pixels, partial tiles
    feats = torch.randn(B, D, H, W, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < 0.15] = 255
    a = torch.rand(B, H, W, generator=g, dtype=torch.float64)
    r = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)[:, None, None].expand(
        B, H, W).contiguous()
    q = torch.rand(B, H, W, generator=g, dtype=torch.float64) if with_q else None
    results = {}
    for backend in ("cpu", "torch"):
        f, aa = feats.clone().requires_grad_(), a.clone().requires_grad_()
        loss = multires_pair_contrast(f, labels, aa, r, q, tau=0.7, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), f.grad, aa.grad)
    assert len(calls) == 3  # the "cpu" run went through the emulated kernels, three times
    for got, want in zip(results["cpu"], results["torch"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
