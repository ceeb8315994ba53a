"""Pixel-to-pixel supervised contrast (CLUDA-style) with an online logsumexp over column tiles, so
the [N, N] similarity matrix is never stored (ops.md section 6).

The features are L2-normalised here (``_UnitNormalize`` on the [B, D, P] view: F.normalize's
result, with a backward that keeps one feature-sized temporary where autograd's chain of ops kept
four); the compiled kernels (``torch.ops.fastuda.pixel_contrast_forward/backward``) see unit
features and return the per-pixel loss plus what the backward needs: the negatives' logsumexp,
the positives' accumulated sigmoid and the number of positives of each anchor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _backend, _op, reference

_EPS = 1e-12  # F.normalize's


class _UnitNormalize(torch.autograd.Function):
    """u = x / max(||x||, eps) along dim 1, computed in ``acc`` (x's dtype may be narrower).

    Backward: g_x = (g - u (u . g)) / ||x|| where ||x|| > eps, g / eps elsewhere (u is then x / eps,
    a linear map); the result is cast back to x's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, acc: torch.dtype) -> Tensor:  # noqa: ANN001
        ctx.x_dtype = x.dtype
        x = x.to(acc)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        denom = norm.clamp_min(_EPS)
        unit = x / denom
        ctx.save_for_backward(unit, denom, (norm > _EPS).to(acc))
        return unit

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        unit, denom, above = ctx.saved_tensors
        radial = (g * unit).sum(dim=1, keepdim=True).mul_(above)
        grad = torch.addcmul(g, unit, radial, value=-1).div_(denom)
        return grad.to(ctx.x_dtype), None


def pixel_contrast(feats: Tensor, labels: Tensor, *, tau: float, weights: Tensor | None = None,
                   pair_weights: Tensor | None = None, ignore_index: int = 255,
                   reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Supervised contrast among the valid pixels of a batch on L2-normalised features.

    For anchor i: l_i = -(1/|P_i|) sum_p w_ip [s_ip - log(exp(s_ip) + sum_n exp(s_in))] with
    s = cos/tau, positives P_i the other valid pixels of its class, negatives those of the others,
    w_ip = a_i a_p with ``pair_weights`` a (gradients flow to a), else 1. ``weights`` scale each
    anchor's loss. Anchors without a positive do not count; "mean" averages over those that do."""
    _backend.check_feats("pixel_contrast", feats)
    _backend.check_labels("pixel_contrast", labels)
    _backend.check_devices("pixel_contrast", feats, weights=weights, pair_weights=pair_weights)
    labels_bp = _backend.as_bp(labels, feats)
    weights_bp = None if weights is None else _backend.as_bp(weights, feats, "weights")
    pair_bp = None if pair_weights is None else _backend.as_bp(pair_weights, feats, "pair_weights")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"fastuda.ops.pixel_contrast: reduction must be 'mean', 'sum' or 'none', "
                         f"got {reduction!r}")
    if tau <= 0:
        raise ValueError(f"fastuda.ops.pixel_contrast: tau must be > 0, got {tau}")
    # any label value other than ignore_index is a class: no range check
    which = PIXEL_CONTRAST.dispatch(backend, feats.device)
    if which == "torch":
        return reference.pixel_contrast(feats, labels, tau=tau, weights=weights,
                                        pair_weights=pair_weights, ignore_index=ignore_index,
                                        reduction=reduction)
    acc = torch.float64 if feats.dtype == torch.float64 else torch.float32
    # normalise in the accumulation dtype, as the reference does
    unit = _UnitNormalize.apply(_backend.as_bdp(feats), acc)
    pair_bp = None if pair_bp is None else pair_bp.to(acc)
    # anchor weights that need a gradient are applied here, outside the kernel
    kernel_weights = None
    if weights_bp is not None and not weights_bp.requires_grad:
        kernel_weights, weights_bp = weights_bp.to(acc), None
    per, _, _, n_pos = PIXEL_CONTRAST.kernel(which)(
        unit, labels_bp, float(tau), int(ignore_index), kernel_weights, pair_bp)
    counted = n_pos > 0
    if weights_bp is not None:
        per = per * weights_bp.to(acc)
    if reduction == "none":
        return per.reshape(labels.shape)
    if reduction == "sum":
        return per.sum()
    return per.sum() / counted.sum().clamp_min(1)


def positives_per_anchor(labels_bp: Tensor, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """|P_i| of every pixel [B, P]: the other valid pixels of its class over the whole batch (any
    label value is a class), 0 at ignored pixels. The n_pos output of pixel_contrast_forward, for
    kernels that do not count it themselves."""
    y = labels_bp.long()
    valid = y != ignore_index
    # ignored pixels share the value ignore_index, which no valid pixel has
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    return torch.where(valid, counts[inverse] - 1, 0).to(dtype)


# ---------------------------------------------------------------------------------------------
# fake (meta) and autograd implementations, shared by every namespace with these schemas
# ---------------------------------------------------------------------------------------------
def _fake_forward(feats: Tensor, labels: Tensor, tau: float, ignore_index: int,
                  weights: Tensor | None, pair_weights: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, _, P = feats.shape
    dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
    loss = feats.new_empty((B, P), dtype=dtype)
    return loss, torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss)


def _fake_backward(grad_loss: Tensor, feats: Tensor, labels: Tensor, neg_lse: Tensor,
                   pos_acc: Tensor, tau: float, ignore_index: int, weights: Tensor | None,
                   pair_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    grad_pair = (feats.new_empty((0,), dtype=torch.float32) if pair_weights is None
                 else pair_weights.new_empty(labels.shape))
    return feats.new_empty(feats.shape), grad_pair


def _setup_context(ctx, inputs, output) -> None:
    feats, labels, tau, ignore_index, weights, pair_weights = inputs
    ctx.save_for_backward(feats, labels, output[1], output[2], weights, pair_weights)
    ctx.tau, ctx.ignore_index = tau, ignore_index


def make_backward(backward_op: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., tuple]:
    """The autograd backward of a pixel_contrast_forward op that calls ``backward_op`` (a
    pixel_contrast_backward with the same schema). torch.ops.fastuda uses it; the tests register
    it for the emulated CUDA kernels (torch.ops.fastuda_emu), so both run the same autograd path."""
    def backward(ctx, grad_loss: Tensor, *_aux_grads: Tensor | None):
        feats, labels, neg_lse, pos_acc, weights, pair_weights = ctx.saved_tensors
        need_feats, need_pair = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
        if not (need_feats or need_pair):
            return None, None, None, None, None, None
        if grad_loss is None:
            grad_loss = neg_lse.new_zeros(neg_lse.shape)
        grad_feats, grad_pair = backward_op(grad_loss, feats, labels, neg_lse, pos_acc, ctx.tau,
                                            ctx.ignore_index, weights, pair_weights)
        return (grad_feats if need_feats else None), None, None, None, None, (
            grad_pair if need_pair else None)
    return backward


# any label value is a class: there is no label range to check
PIXEL_CONTRAST = _op.Op(
    "pixel_contrast", ("pixel_contrast_forward", "pixel_contrast_backward"),
    reference.pixel_contrast,
    {"pixel_contrast_forward": _fake_forward, "pixel_contrast_backward": _fake_backward},
    _op.Autograd("pixel_contrast_forward", "pixel_contrast_backward", make_backward,
                 _setup_context),
    triton="fastuda.ops.triton.pixel")
_op.register_compiled(PIXEL_CONTRAST)


def _supported(with_triton: bool) -> tuple[str, ...]:
    """See Op.supported."""
    return PIXEL_CONTRAST.supported(with_triton)
