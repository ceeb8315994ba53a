"""Memory-bank contrast (BankCL): positives are the bank entries of the pixel's class, negatives the
mean entry of every other class (ops.md section 5).

The compiled kernels (``torch.ops.fastuda.bank_contrast_forward/backward``) return the per-pixel
loss and the negatives' logsumexp the backward reuses; this module registers their autograd and
fake implementations and does the reduction. The bank is a buffer of detached batch centroids: the
compiled backends give it no gradient (and refuse a bank that requires one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _backend, _op, reference


def bank_contrast(feats: Tensor, labels: Tensor, bank: Tensor, bank_len: Tensor, *, tau: float,
                  ignore_index: int = 255, reduction: str = "mean",
                  backend: str = "auto") -> Tensor:
    """BankCL loss. feats ``[N, D]`` / ``[B, D, H, W]``, labels ``[N]`` / ``[B, H, W]``, bank
    ``[C, M, D]`` (entries ``j < bank_len[c]`` are live), ``bank_len [C]``.

    l_i = -(1/M_y) sum_j log(exp(f.b_yj/tau) / (exp(f.b_yj/tau) + sum_k exp(f.bbar_k/tau))), over
    the live entries of the pixel's class y and the mean live entry bbar_k of every other class
    with one; pixels whose class has no live entry are skipped. ``reduction``: "mean" (over the
    pixels that count), "sum" or "none" (per-pixel, shaped like labels)."""
    _backend.check_feats("bank_contrast", feats)
    _backend.check_labels("bank_contrast", labels)
    _backend.check_devices("bank_contrast", feats, bank=bank)
    labels_bp = _backend.as_bp(labels, feats)
    if bank.dim() != 3 or bank.shape[2] != feats.shape[1] or bank_len.shape != bank.shape[:1]:
        raise ValueError(f"fastuda.ops.bank_contrast: bank {tuple(bank.shape)} / bank_len "
                         f"{tuple(bank_len.shape)} do not match feats {tuple(feats.shape)} "
                         "(expected bank [C, M, D] and bank_len [C])")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"fastuda.ops.bank_contrast: reduction must be 'mean', 'sum' or 'none', "
                         f"got {reduction!r}")
    which = BANK_CONTRAST.dispatch(backend, feats.device, labels_bp, bank.shape[0], ignore_index)
    if which == "torch":
        return reference.bank_contrast(feats, labels, bank, bank_len, tau=tau,
                                       ignore_index=ignore_index, reduction=reduction)
    if bank.requires_grad:
        raise ValueError("fastuda.ops.bank_contrast: the compiled backends give the bank no "
                         "gradient (it holds detached centroids); pass bank.detach() or use "
                         "backend='torch'")
    per = BANK_CONTRAST.kernel(which)(_backend.as_bdp(feats), labels_bp, bank, bank_len,
                                      float(tau), int(ignore_index))[0]
    if reduction == "none":
        return per.reshape(labels.shape)
    if reduction == "sum":
        return per.sum()
    return per.sum() / _counted(labels_bp, bank_len, ignore_index).clamp_min(1)


def _counted(labels_bp: Tensor, bank_len: Tensor, ignore_index: int) -> Tensor:
    """Number of pixels that count: a valid label whose class has a live entry (labels are
    already range-checked by the kernel). A tensor, so no host sync and torch.compile-friendly."""
    y = labels_bp.long()
    valid = y != ignore_index
    lens = bank_len.to(device=y.device, dtype=torch.long)
    return (valid & (lens[torch.where(valid, y, 0)] > 0)).sum()


# ---------------------------------------------------------------------------------------------
# fake (meta) and autograd implementations, shared by every namespace with these schemas
# ---------------------------------------------------------------------------------------------
def _fake_forward(feats: Tensor, labels: Tensor, bank: Tensor, bank_len: Tensor, tau: float,
                  ignore_index: int) -> tuple[Tensor, Tensor]:
    B, _, P = feats.shape
    loss = feats.new_empty((B, P), dtype=_op.out_dtype(feats))
    return loss, torch.empty_like(loss)


def _fake_backward(grad_loss: Tensor, feats: Tensor, labels: Tensor, bank: Tensor,
                   bank_len: Tensor, neg_lse: Tensor, tau: float, ignore_index: int) -> Tensor:
    return feats.new_empty(feats.shape)


def _setup_context(ctx, inputs, output) -> None:
    feats, labels, bank, bank_len, tau, ignore_index = inputs
    ctx.save_for_backward(feats, labels, bank, bank_len, output[1])
    ctx.tau, ctx.ignore_index = tau, ignore_index


def _make_backward(backward_op: Callable[..., Tensor]) -> Callable[..., tuple]:
    def backward(ctx, grad_loss: Tensor, _grad_neg_lse: Tensor | None):
        feats, labels, bank, bank_len, neg_lse = ctx.saved_tensors
        grad_feats = None
        if ctx.needs_input_grad[0]:
            if grad_loss is None:
                grad_loss = neg_lse.new_zeros(neg_lse.shape)
            grad_feats = backward_op(grad_loss, feats, labels, bank, bank_len, neg_lse, ctx.tau,
                                     ctx.ignore_index)
        return grad_feats, None, None, None, None, None
    return backward


# Every kernel (C++, CUDA, Triton) checks the label range itself.
BANK_CONTRAST = _op.Op(
    "bank_contrast", ("bank_contrast_forward", "bank_contrast_backward"),
    reference.bank_contrast,
    {"bank_contrast_forward": _fake_forward, "bank_contrast_backward": _fake_backward},
    _op.Autograd("bank_contrast_forward", "bank_contrast_backward", _make_backward,
                 _setup_context),
    triton="fastuda.ops.triton.bank",
    kernel_label_check=frozenset({"cpu", "cuda", "triton"}))
_op.register_compiled(BANK_CONTRAST)


def _supported(with_triton: bool) -> tuple[str, ...]:
    """See Op.supported."""
    return BANK_CONTRAST.supported(with_triton)
