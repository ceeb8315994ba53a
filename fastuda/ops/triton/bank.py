"""Triton kernels for memory-bank contrast (BankCL, ops.md section 5).

For pixel i of class y with L_y = bank_len[y] > 0 live entries b_{y,j}:
    pos_j = f.b_{y,j} / tau,  neg_k = f.bbar_k / tau for every other class k with live entries,
    nlse  = logsumexp_k neg_k  (-inf when there is none),
    l_i   = -(1 / L_y) sum_j [pos_j - logaddexp(pos_j, nlse)].

One program owns BLOCK_P pixels of one image. The negatives are one [BLOCK_C, BLOCK_P] tl.dot
against the class means bbar [C, D] (C dot products per pixel, not C * M). The positives loop
over the classes and skip every class absent from the tile; for a present class the whole bank
slice [BLOCK_M, D] meets the feature tile in BLOCK_D slices ([BLOCK_M, BLOCK_P] scores, tensor
cores). Pixels of a tile usually belong to one to three classes, so the positive work is about
M * D per pixel. The bank gets no gradient (it is a buffer of detached centroids).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..bank_contrast import BANK_CONTRAST
from . import _contrast_common as cc


@triton.jit
def _bank_negatives(f_ptr, sfb, sfd, sfp, b, offs_p, pmask, y, bbar_ptr, lens_c, D, C, inv_tau,
                    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                    ACC: tl.constexpr, PREC: tl.constexpr):
    """neg_k logits [BLOCK_C, BLOCK_P] and which of them are negatives of each pixel."""
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    neg = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        f = tl.load(f_ptr + b * sfb + offs_d[:, None] * sfd + offs_p[None, :] * sfp,
                    mask=dmask[:, None] & pmask[None, :], other=0.0).to(ACC)
        bbar = tl.load(bbar_ptr + offs_c[:, None] * D + offs_d[None, :],
                       mask=cmask[:, None] & dmask[None, :], other=0.0)
        neg += tl.dot(bbar, f, input_precision=PREC, out_dtype=ACC)
    neg_ok = (cmask & (lens_c > 0))[:, None] & (offs_c[:, None] != y[None, :])
    return neg * inv_tau, neg_ok


@triton.jit
def _bank_positives(f_ptr, sfb, sfd, sfp, b, offs_p, pmask, bank_ptr, sbc, sbm, sbd, c, n_live,
                    D, inv_tau, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """pos [BLOCK_M, BLOCK_P] = b_{c,j} . f / tau for the tile's pixels."""
    offs_m = tl.arange(0, BLOCK_M)
    mmask = offs_m < n_live
    pos = tl.zeros((BLOCK_M, BLOCK_P), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        f = tl.load(f_ptr + b * sfb + offs_d[:, None] * sfd + offs_p[None, :] * sfp,
                    mask=dmask[:, None] & pmask[None, :], other=0.0).to(ACC)
        entries = tl.load(bank_ptr + c * sbc + offs_m[:, None] * sbm + offs_d[None, :] * sbd,
                          mask=mmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        pos += tl.dot(entries, f, input_precision=PREC, out_dtype=ACC)
    return pos * inv_tau


@triton.jit
def _bank_tile_setup(y_ptr, syb, syp, len_ptr, b, offs_p, pmask, C, M, ignore_index, err_ptr,
                     CHECK: tl.constexpr, BLOCK_C: tl.constexpr):
    y, valid = cc.labels_tile(y_ptr, syb, syp, b, offs_p, pmask, C, ignore_index, err_ptr, CHECK)
    offs_c = tl.arange(0, BLOCK_C)
    # live entries per class, clamped to the bank size M
    lens_c = tl.minimum(tl.load(len_ptr + offs_c, mask=offs_c < C, other=0), M).to(tl.int32)
    len_y = tl.minimum(tl.load(len_ptr + y, mask=valid, other=0), M).to(tl.int32)
    valid = valid & (len_y > 0)
    return y, valid, lens_c


@triton.jit
def _bank_fwd_kernel(
        f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, bank_ptr, sbc, sbm, sbd, len_ptr, bbar_ptr,
        loss_ptr, nlse_ptr, err_ptr, P, D, C, M, ignore_index, inv_tau,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_M: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    y, valid, lens_c = _bank_tile_setup(y_ptr, syb, syp, len_ptr, b, offs_p, pmask, C, M,
                                        ignore_index, err_ptr, True, BLOCK_C)
    neg, neg_ok = _bank_negatives(f_ptr, sfb, sfd, sfp, b, offs_p, pmask, y, bbar_ptr, lens_c,
                                  D, C, inv_tau, BLOCK_P, BLOCK_D, BLOCK_C, ACC, PREC)
    neg = tl.where(neg_ok, neg, float("-inf"))
    m = tl.max(neg, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.exp(neg - m[None, :]), axis=0)
    nlse = tl.where(s > 0, m + tl.log(tl.where(s > 0, s, 1.0)), float("-inf"))
    loss = tl.zeros((BLOCK_P,), dtype=ACC)
    offs_m = tl.arange(0, BLOCK_M)
    for c in range(0, C):
        sel = valid & (y == c)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            n_live = tl.minimum(tl.load(len_ptr + c), M).to(tl.int32)
            pos = _bank_positives(f_ptr, sfb, sfd, sfp, b, offs_p, pmask, bank_ptr, sbc, sbm,
                                  sbd, c, n_live, D, inv_tau, BLOCK_P, BLOCK_D, BLOCK_M, ACC,
                                  PREC)
            top = tl.maximum(pos, nlse[None, :])
            term = pos - top - tl.log(tl.exp(pos - top) + tl.exp(nlse[None, :] - top))
            total = tl.sum(tl.where((offs_m < n_live)[:, None], term, 0.0), axis=0)
            loss = tl.where(sel, -total / n_live.to(ACC), loss)
    out = b * P + offs_p
    tl.store(loss_ptr + out, tl.where(valid, loss, 0.0), mask=pmask)
    tl.store(nlse_ptr + out, tl.where(valid, nlse, 0.0), mask=pmask)


@triton.jit
def _bank_bwd_kernel(
        g_ptr, sgb, sgp, f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, bank_ptr, sbc, sbm, sbd,
        len_ptr, bbar_ptr, nlse_ptr, df_ptr, err_ptr, P, D, C, M, ignore_index, inv_tau,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_M: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    y, valid, lens_c = _bank_tile_setup(y_ptr, syb, syp, len_ptr, b, offs_p, pmask, C, M,
                                        ignore_index, err_ptr, False, BLOCK_C)
    neg, neg_ok = _bank_negatives(f_ptr, sfb, sfd, sfp, b, offs_p, pmask, y, bbar_ptr, lens_c,
                                  D, C, inv_tau, BLOCK_P, BLOCK_D, BLOCK_C, ACC, PREC)
    nlse = tl.load(nlse_ptr + b * P + offs_p, mask=pmask, other=0.0)
    nlse = tl.where(valid, nlse, 0.0)
    g = tl.load(g_ptr + b * sgb + offs_p * sgp, mask=pmask, other=0.0).to(ACC)
    g = tl.where(valid, g, 0.0)
    offs_m = tl.arange(0, BLOCK_M)
    # dl/dpos_j = -(1 - sigma_j) / L with sigma_j = exp(pos_j - logaddexp(pos_j, nlse)); each
    # pixel has one class, so one [BLOCK_M, BLOCK_P] tile holds every pixel's column
    g_pos = tl.zeros((BLOCK_M, BLOCK_P), dtype=ACC)
    g_nlse = tl.zeros((BLOCK_P,), dtype=ACC)
    for c in range(0, C):
        sel = valid & (y == c)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            n_live = tl.minimum(tl.load(len_ptr + c), M).to(tl.int32)
            pos = _bank_positives(f_ptr, sfb, sfd, sfp, b, offs_p, pmask, bank_ptr, sbc, sbm,
                                  sbd, c, n_live, D, inv_tau, BLOCK_P, BLOCK_D, BLOCK_M, ACC,
                                  PREC)
            top = tl.maximum(pos, nlse[None, :])
            lae = top + tl.log(tl.exp(pos - top) + tl.exp(nlse[None, :] - top))
            one_minus_sigma = tl.where((offs_m < n_live)[:, None], tl.exp(nlse[None, :] - lae),
                                       0.0)
            inv_len = 1.0 / n_live.to(ACC)
            g_pos = tl.where(sel[None, :], -one_minus_sigma * inv_len, g_pos)
            g_nlse = tl.where(sel, tl.sum(one_minus_sigma, axis=0) * inv_len, g_nlse)
    # dl/dneg_k = g_nlse * softmax_k over the pixel's negatives
    neg_ok = neg_ok & valid[None, :]
    g_neg = tl.where(neg_ok, tl.exp(tl.where(neg_ok, neg - nlse[None, :], 0.0)), 0.0)
    g_neg = g_neg * (g * g_nlse * inv_tau)[None, :]
    g_pos = g_pos * (g * inv_tau)[None, :]
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        bbar_t = tl.load(bbar_ptr + offs_c[None, :] * D + offs_d[:, None],
                         mask=dmask[:, None] & cmask[None, :], other=0.0)
        df = tl.dot(bbar_t, g_neg, input_precision=PREC, out_dtype=ACC)
        for c in range(0, C):
            sel = valid & (y == c)
            if tl.sum(sel.to(tl.int32), axis=0) > 0:
                n_live = tl.minimum(tl.load(len_ptr + c), M).to(tl.int32)
                entries_t = tl.load(bank_ptr + c * sbc + offs_m[None, :] * sbm
                                    + offs_d[:, None] * sbd,
                                    mask=dmask[:, None] & (offs_m < n_live)[None, :],
                                    other=0.0).to(ACC)
                df += tl.dot(entries_t, tl.where(sel[None, :], g_pos, 0.0), input_precision=PREC,
                             out_dtype=ACC)
        tl.store(df_ptr + b * D * P + offs_d[:, None] * P + offs_p[None, :],
                 df.to(df_ptr.dtype.element_ty), mask=dmask[:, None] & pmask[None, :])


def _config(C: int, M: int) -> dict[str, int]:
    block_c, block_m = cc.pow2(C), cc.pow2(M)
    if cc.interpreting(_bank_fwd_kernel):
        return {"BLOCK_P": 16, "BLOCK_D": 16, "BLOCK_C": block_c, "BLOCK_M": block_m,
                "num_warps": 4}
    # the backward keeps a [BLOCK_M, BLOCK_P] fp32 tile of positive gradients in registers
    block_p = max(16, min(64, 4096 // block_m))
    return {"BLOCK_P": block_p, "BLOCK_D": 32, "BLOCK_C": block_c, "BLOCK_M": block_m,
            "num_warps": 8}


def _class_means(bank: Tensor, bank_len: Tensor, acc: torch.dtype) -> Tensor:
    """bbar [C, D]: mean of each class's live entries (0 for a class without any); C * M * D."""
    C, M, _ = bank.shape
    lens = bank_len.to(device=bank.device, dtype=torch.long).clamp(0, M)
    live = (torch.arange(M, device=bank.device)[None, :] < lens[:, None]).to(acc)
    return ((bank.to(acc) * live[..., None]).sum(1) / lens.clamp_min(1)[:, None].to(acc)
            ).contiguous()


def _bank_forward(feats: Tensor, labels: Tensor, bank: Tensor, bank_len: Tensor, tau: float,
                  ignore_index: int) -> tuple[Tensor, Tensor]:
    B, D, P = feats.shape
    C, M, _ = bank.shape
    acc = cc.acc_torch_dtype(feats)
    loss = torch.empty((B, P), dtype=acc, device=feats.device)
    nlse = torch.empty((B, P), dtype=acc, device=feats.device)
    if B * P == 0:
        return loss, nlse
    cfg = _config(C, M)
    err = cc.new_label_error(feats)
    _bank_fwd_kernel[(triton.cdiv(P, cfg["BLOCK_P"]), B)](
        feats, *feats.stride(), labels, *labels.stride(), bank, *bank.stride(), bank_len,
        _class_means(bank, bank_len, acc), loss, nlse, err, P, D, C, M, ignore_index, 1.0 / tau,
        ACC=cc.acc_tl_dtype(feats), PREC=cc.dot_precision(_bank_fwd_kernel, feats), **cfg)
    cc.raise_label_error("bank_contrast", err, C, ignore_index)
    return loss, nlse


def _bank_backward(grad_loss: Tensor, feats: Tensor, labels: Tensor, bank: Tensor,
                   bank_len: Tensor, nlse: Tensor, tau: float, ignore_index: int) -> Tensor:
    B, D, P = feats.shape
    C, M, _ = bank.shape
    grad_feats = torch.empty((B, D, P), dtype=feats.dtype, device=feats.device)
    if B * P == 0 or D == 0:
        return grad_feats
    cfg = _config(C, M)
    _bank_bwd_kernel[(triton.cdiv(P, cfg["BLOCK_P"]), B)](
        grad_loss, *grad_loss.stride(), feats, *feats.stride(), labels, *labels.stride(),
        bank, *bank.stride(), bank_len, _class_means(bank, bank_len, cc.acc_torch_dtype(feats)),
        nlse, grad_feats, cc.new_label_error(feats), P, D, C, M, ignore_index, 1.0 / tau,
        ACC=cc.acc_tl_dtype(feats), PREC=cc.dot_precision(_bank_bwd_kernel, feats), **cfg)
    return grad_feats


# the schemas of csrc/ops_schema.h as torch.ops.fastuda_triton.*, with the fake and autograd of
# fastuda/ops/bank_contrast.py
BANK_CONTRAST.define_triton({"bank_contrast_forward": _bank_forward,
                             "bank_contrast_backward": _bank_backward})


def bank_contrast_per_pixel(feats: Tensor, labels: Tensor, bank: Tensor, bank_len: Tensor,
                            tau: float, ignore_index: int) -> Tensor:
    """Per-pixel BankCL loss [B, P] (fp32; fp64 for fp64 feats), 0 at pixels that do not count
    (ignored, or whose class has no live entry). feats [B, D, P] any strides, labels [B, P],
    bank [C, M, D], bank_len [C] (entries j < bank_len[c] are live; values above M count as M).
    Differentiable w.r.t. feats only."""
    op = "bank_contrast_per_pixel"
    _, D, _ = cc.check_feats(op, feats)
    cc.check_pixel_map(op, "labels", labels, feats, integer=True)
    if bank.dim() != 3 or bank.shape[2] != D:
        raise ValueError(f"fastuda_triton.{op}: bank shape {tuple(bank.shape)} does not match "
                         f"feats shape {tuple(feats.shape)} (expected [C, M, {D}])")
    if tuple(bank_len.shape) != (bank.shape[0],):
        raise ValueError(f"fastuda_triton.{op}: bank_len shape {tuple(bank_len.shape)} does not "
                         f"match bank shape {tuple(bank.shape)} (expected [{bank.shape[0]}])")
    if bank_len.dtype.is_floating_point or bank_len.dtype == torch.bool:
        raise TypeError(f"fastuda_triton.{op}: bank_len must be an integer tensor, "
                        f"got {bank_len.dtype}")
    cc.check_device(op, _bank_fwd_kernel, feats, labels, bank, bank_len)
    return torch.ops.fastuda_triton.bank_contrast_forward(feats, labels, bank, bank_len,
                                                          float(tau), int(ignore_index))[0]
