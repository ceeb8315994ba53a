"""Triton kernels for pixel-to-pixel supervised contrast (CLUDA-style, ops.md section 6).

Features arrive L2-normalised (the caller normalises). With s_ij = f_i.f_j / tau, P_i the other
valid pixels of i's class, N_i the valid pixels of other classes, a the optional pair weights:
    L_i = logsumexp_{n in N_i} s_in  (-inf when N_i is empty),
    T_ij = s_ij - logaddexp(s_ij, L_i),
    l_i = -(w_i a_i / |P_i|) sum_{p in P_i} a_p T_ip   (anchors with P_i empty do not count).

The B*P pixels of the batch are one flat index. A program owns BLOCK_N anchor rows and keeps their
[D, BLOCK_N] features in registers; it walks the column tiles, computing the [BLOCK_N, BLOCK_N]
similarity tile with one tl.dot (K = D padded to a power of two), so the N x N matrix never exists.
Forward: pass 1 is an online logsumexp over the negatives (and counts the positives), pass 2 sums
the positive terms (column tiles without a positive of the row tile are skipped).
Backward: a first kernel computes per pixel u_i = g_i w_i a_i / |P_i| and
R_i = u_i sum_p a_p (1 - sigma_ip); the second recomputes each similarity tile once and, because
S is symmetric, adds both dS_ij (row i as anchor) and dS_ji (column j as anchor) into the row's
gradient [D, BLOCK_N] with a second tl.dot, so no gradient is scattered to other programs
(deterministic, no atomics). Work: 2 N^2 D forward, 3 N^2 D backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..pixel_contrast import PIXEL_CONTRAST, positives_per_anchor
from . import _contrast_common as cc


@triton.jit
def _pixel_tile(f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, offs, N, P, D, ignore_index,
                BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """Labels (int64), valid mask and [BLOCK_D, len(offs)] features of flat pixel ids ``offs``."""
    nmask = offs < N
    bi = offs // P
    pi = offs % P
    y = tl.load(y_ptr + bi * syb + pi * syp, mask=nmask, other=0).to(tl.int64)
    valid = nmask & (y != ignore_index)
    offs_d = tl.arange(0, BLOCK_D)
    f = tl.load(f_ptr + bi[None, :] * sfb + offs_d[:, None] * sfd + pi[None, :] * sfp,
                mask=(offs_d < D)[:, None] & nmask[None, :], other=0.0).to(DOT)
    return y, valid, f


@triton.jit
def _pixel_map(ptr, sb, sp, offs, N, P, HAS: tl.constexpr, ACC: tl.constexpr):
    """A per-pixel [B, P] map at flat ids ``offs``, or ones when absent."""
    if HAS:
        v = tl.load(ptr + (offs // P) * sb + (offs % P) * sp, mask=offs < N, other=0.0).to(ACC)
    else:
        v = tl.full(offs.shape, 1.0, ACC)
    return v


@triton.jit
def _log_add_exp(s, lse):
    top = tl.maximum(s, lse)
    return top + tl.log(tl.exp(s - top) + tl.exp(lse - top))


@triton.jit
def _pixel_fwd_kernel(
        f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, w_ptr, swb, swp, a_ptr, sab, sap,
        loss_ptr, nlse_ptr, pacc_ptr, N, P, D, ignore_index, inv_tau,
        HAS_W: tl.constexpr, HAS_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    y_r, v_r, f_r = _pixel_tile(f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, rows, N, P, D,
                                ignore_index, BLOCK_D, DOT)
    f_rt = tl.trans(f_r)
    # pass 1: online logsumexp over the negatives, count of positives
    run_max = tl.full((BLOCK_N,), float("-inf"), ACC)
    run_sum = tl.zeros((BLOCK_N,), dtype=ACC)
    n_pos = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        y_c, v_c, f_c = _pixel_tile(f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, cols, N, P, D,
                                    ignore_index, BLOCK_D, DOT)
        s = tl.dot(f_rt, f_c, input_precision=PREC, out_dtype=ACC) * inv_tau
        both = v_r[:, None] & v_c[None, :]
        same = y_r[:, None] == y_c[None, :]
        n_pos += tl.sum((both & same & (rows[:, None] != cols[None, :])).to(tl.int32), axis=1)
        s_neg = tl.where(both & ~same, s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s_neg, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(s_neg - safe[:, None]), axis=1)
        run_max = new_max
    safe = tl.where(run_max == float("-inf"), 0.0, run_max)
    nlse = tl.where(run_sum > 0, safe + tl.log(tl.where(run_sum > 0, run_sum, 1.0)),
                    float("-inf"))
    # pass 2: sum_p a_p T_ip over the positives
    pos_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        y_c = tl.load(y_ptr + (cols // P) * syb + (cols % P) * syp, mask=cmask,
                      other=0).to(tl.int64)
        v_c = cmask & (y_c != ignore_index)
        pos = (v_r[:, None] & v_c[None, :] & (y_r[:, None] == y_c[None, :])
               & (rows[:, None] != cols[None, :]))
        if tl.sum(tl.sum(pos.to(tl.int32), axis=1), axis=0) > 0:
            _, _, f_c = _pixel_tile(f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, cols, N, P, D,
                                    ignore_index, BLOCK_D, DOT)
            s = tl.dot(f_rt, f_c, input_precision=PREC, out_dtype=ACC) * inv_tau
            term = s - _log_add_exp(s, nlse[:, None])
            if HAS_A:
                term = term * _pixel_map(a_ptr, sab, sap, cols, N, P, HAS_A, ACC)[None, :]
            pos_acc += tl.sum(tl.where(pos, term, 0.0), axis=1)
    anchor = v_r & (n_pos > 0)
    coef = (_pixel_map(w_ptr, swb, swp, rows, N, P, HAS_W, ACC)
            * _pixel_map(a_ptr, sab, sap, rows, N, P, HAS_A, ACC)
            / tl.maximum(n_pos, 1).to(ACC))
    rmask = rows < N
    tl.store(loss_ptr + rows, tl.where(anchor, -coef * pos_acc, 0.0), mask=rmask)
    tl.store(nlse_ptr + rows, tl.where(anchor, nlse, 0.0), mask=rmask)
    tl.store(pacc_ptr + rows, tl.where(anchor, pos_acc, 0.0), mask=rmask)


@triton.jit
def _pixel_bwd_coef_kernel(
        g_ptr, sgb, sgp, f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, w_ptr, swb, swp, a_ptr, sab, sap,
        nlse_ptr, pacc_ptr, u_ptr, r_ptr, ga_ptr, N, P, D, ignore_index, inv_tau,
        HAS_W: tl.constexpr, HAS_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """u_i = g_i w_i a_i / |P_i|, R_i = u_i sum_p a_p (1 - sigma_ip) (0 for non-anchors), and
    the anchor's own part of the pair-weight gradient, -g_i w_i / |P_i| sum_p a_p T_ip."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y_r, v_r, f_r = _pixel_tile(f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, rows, N, P, D,
                                ignore_index, BLOCK_D, DOT)
    f_rt = tl.trans(f_r)
    nlse = tl.load(nlse_ptr + rows, mask=rmask, other=0.0)
    n_pos = tl.zeros((BLOCK_N,), dtype=tl.int32)
    r_sum = tl.zeros((BLOCK_N,), dtype=ACC)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        y_c = tl.load(y_ptr + (cols // P) * syb + (cols % P) * syp, mask=cmask,
                      other=0).to(tl.int64)
        v_c = cmask & (y_c != ignore_index)
        pos = (v_r[:, None] & v_c[None, :] & (y_r[:, None] == y_c[None, :])
               & (rows[:, None] != cols[None, :]))
        n_pos_tile = tl.sum(pos.to(tl.int32), axis=1)
        if tl.sum(n_pos_tile, axis=0) > 0:
            n_pos += n_pos_tile
            _, _, f_c = _pixel_tile(f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, cols, N, P, D,
                                    ignore_index, BLOCK_D, DOT)
            s = tl.dot(f_rt, f_c, input_precision=PREC, out_dtype=ACC) * inv_tau
            one_minus_sigma = tl.exp(nlse[:, None] - _log_add_exp(s, nlse[:, None]))
            if HAS_A:
                one_minus_sigma = (one_minus_sigma
                                   * _pixel_map(a_ptr, sab, sap, cols, N, P, HAS_A, ACC)[None, :])
            r_sum += tl.sum(tl.where(pos, one_minus_sigma, 0.0), axis=1)
    anchor = v_r & (n_pos > 0)
    g = tl.load(g_ptr + (rows // P) * sgb + (rows % P) * sgp, mask=rmask, other=0.0).to(ACC)
    gw = tl.where(anchor, g * _pixel_map(w_ptr, swb, swp, rows, N, P, HAS_W, ACC)
                  / tl.maximum(n_pos, 1).to(ACC), 0.0)
    u = gw * _pixel_map(a_ptr, sab, sap, rows, N, P, HAS_A, ACC)
    tl.store(u_ptr + rows, u, mask=rmask)
    tl.store(r_ptr + rows, u * r_sum, mask=rmask)
    if HAS_A:
        tl.store(ga_ptr + rows, -gw * tl.load(pacc_ptr + rows, mask=rmask, other=0.0),
                 mask=rmask)


@triton.jit
def _pixel_bwd_kernel(
        f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, a_ptr, sab, sap, nlse_ptr, u_ptr, r_ptr,
        df_ptr, ga_ptr, N, P, D, ignore_index, inv_tau,
        HAS_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y_r, v_r, f_r = _pixel_tile(f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, rows, N, P, D,
                                ignore_index, BLOCK_D, DOT)
    f_rt = tl.trans(f_r)
    nlse_r = tl.load(nlse_ptr + rows, mask=rmask, other=0.0)
    u_r = tl.load(u_ptr + rows, mask=rmask, other=0.0)
    r_r = tl.load(r_ptr + rows, mask=rmask, other=0.0)
    a_r = _pixel_map(a_ptr, sab, sap, rows, N, P, HAS_A, ACC)
    grad = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    grad_a = tl.zeros((BLOCK_N,), dtype=ACC)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        y_c, v_c, f_c = _pixel_tile(f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, cols, N, P, D,
                                    ignore_index, BLOCK_D, DOT)
        nlse_c = tl.load(nlse_ptr + cols, mask=cmask, other=0.0)
        u_c = tl.load(u_ptr + cols, mask=cmask, other=0.0)
        r_c = tl.load(r_ptr + cols, mask=cmask, other=0.0)
        a_c = _pixel_map(a_ptr, sab, sap, cols, N, P, HAS_A, ACC)
        s = tl.dot(f_rt, f_c, input_precision=PREC, out_dtype=ACC) * inv_tau
        both = v_r[:, None] & v_c[None, :]
        same = y_r[:, None] == y_c[None, :]
        pos = both & same & (rows[:, None] != cols[None, :])
        neg = both & ~same
        # row i as the anchor of s_ij
        lae_r = _log_add_exp(s, nlse_r[:, None])
        d_s = tl.where(pos, -u_r[:, None] * a_c[None, :] * tl.exp(nlse_r[:, None] - lae_r), 0.0)
        d_s += tl.where(neg, r_r[:, None] * tl.exp(tl.where(neg, s - nlse_r[:, None], 0.0)), 0.0)
        # column j as the anchor of s_ji = s_ij
        lae_c = _log_add_exp(s, nlse_c[None, :])
        d_s += tl.where(pos, -u_c[None, :] * a_r[:, None] * tl.exp(nlse_c[None, :] - lae_c), 0.0)
        d_s += tl.where(neg, r_c[None, :] * tl.exp(tl.where(neg, s - nlse_c[None, :], 0.0)), 0.0)
        grad += tl.dot(f_c, tl.trans(d_s).to(DOT), input_precision=PREC, out_dtype=ACC)
        if HAS_A:
            grad_a += tl.sum(tl.where(pos, -u_c[None, :] * (s - lae_c), 0.0), axis=1)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(df_ptr + (rows // P)[None, :] * D * P + offs_d[:, None] * P + (rows % P)[None, :],
             (grad * inv_tau).to(df_ptr.dtype.element_ty),
             mask=(offs_d < D)[:, None] & rmask[None, :])
    if HAS_A:
        tl.store(ga_ptr + rows, tl.load(ga_ptr + rows, mask=rmask, other=0.0) + grad_a,
                 mask=rmask)


def _config(feats: Tensor) -> dict[str, object]:
    D = feats.shape[1]
    block_d = cc.pow2(D)
    if cc.interpreting(_pixel_fwd_kernel):
        # the interpreter's bf16 tl.dot is wrong (numpy has no bf16): upcast bf16 there; fp16
        # keeps the GPU's native-dtype products, so the tests cover that path
        dot = tl.float16 if feats.dtype == torch.float16 else cc.acc_tl_dtype(feats)
        return {"BLOCK_N": 16, "BLOCK_D": block_d, "DOT": dot, "num_warps": 4}
    # anchor features [BLOCK_D, BLOCK_N] and the gradient accumulator stay in registers; the
    # backward's [BLOCK_N, BLOCK_N] temporaries spill at BLOCK_N = 64 (ptxas, sm_90)
    block_n = max(16, min(32, (8192 if feats.dtype != torch.float32 else 4096) // block_d))
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(feats.dtype,
                                                                     cc.acc_tl_dtype(feats))
    return {"BLOCK_N": block_n, "BLOCK_D": block_d, "DOT": dot, "num_warps": 8}


def _pixel_forward(feats: Tensor, labels: Tensor, tau: float, ignore_index: int,
                   weights: Tensor | None, pair_weights: Tensor | None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, D, P = feats.shape
    acc = cc.acc_torch_dtype(feats)
    loss, nlse, pos_acc = (torch.empty((B, P), dtype=acc, device=feats.device) for _ in range(3))
    # the kernel does not count positives: n_pos from the labels, as the schema asks
    n_pos = positives_per_anchor(labels, ignore_index, acc)
    if B * P == 0:
        return loss, nlse, pos_acc, n_pos
    cfg = _config(feats)
    _pixel_fwd_kernel[(triton.cdiv(B * P, cfg["BLOCK_N"]),)](
        feats, *feats.stride(), labels, *labels.stride(),
        cc.dummy(feats) if weights is None else weights, *cc.strides2(weights),
        cc.dummy(feats) if pair_weights is None else pair_weights, *cc.strides2(pair_weights),
        loss, nlse, pos_acc, B * P, P, D, ignore_index, 1.0 / tau,
        HAS_W=weights is not None, HAS_A=pair_weights is not None, ACC=cc.acc_tl_dtype(feats),
        PREC=cc.dot_precision(_pixel_fwd_kernel, feats), **cfg)
    return loss, nlse, pos_acc, n_pos


def _pixel_backward(grad_loss: Tensor, feats: Tensor, labels: Tensor, nlse: Tensor,
                    pos_acc: Tensor, tau: float, ignore_index: int, weights: Tensor | None,
                    pair_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """(grad_feats [B, D, P], grad_pair_weights [B, P] or an empty tensor without pair weights)."""
    B, D, P = feats.shape
    acc = cc.acc_torch_dtype(feats)
    dev = feats.device
    grad_feats = torch.empty((B, D, P), dtype=feats.dtype, device=dev)
    # without pair weights an empty fp32 tensor, as the compiled op (and the shared fake)
    grad_a = (torch.zeros((B, P), dtype=acc, device=dev) if pair_weights is not None
              else feats.new_empty(0, dtype=torch.float32))
    if B * P == 0 or D == 0:
        return grad_feats, grad_a.to(pair_weights.dtype) if pair_weights is not None else grad_a
    cfg = _config(feats)
    N = B * P
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    u = torch.empty(N, dtype=acc, device=dev)
    r = torch.empty(N, dtype=acc, device=dev)
    has_a = pair_weights is not None
    a_args = (cc.dummy(feats) if pair_weights is None else pair_weights,
              *cc.strides2(pair_weights))
    prec = cc.dot_precision(_pixel_bwd_kernel, feats)
    _pixel_bwd_coef_kernel[grid](
        grad_loss, *grad_loss.stride(), feats, *feats.stride(), labels, *labels.stride(),
        cc.dummy(feats) if weights is None else weights, *cc.strides2(weights), *a_args,
        nlse, pos_acc, u, r, grad_a if has_a else cc.dummy(feats), N, P, D, ignore_index,
        1.0 / tau, HAS_W=weights is not None, HAS_A=has_a, ACC=cc.acc_tl_dtype(feats),
        PREC=prec, **cfg)
    _pixel_bwd_kernel[grid](
        feats, *feats.stride(), labels, *labels.stride(), *a_args, nlse, u, r, grad_feats,
        grad_a if has_a else cc.dummy(feats), N, P, D, ignore_index, 1.0 / tau,
        HAS_A=has_a, ACC=cc.acc_tl_dtype(feats), PREC=prec, **cfg)
    if has_a:
        grad_a = grad_a.to(pair_weights.dtype)
    return grad_feats, grad_a


# the schemas of csrc/ops_schema.h as torch.ops.fastuda_triton.*, with the fake and autograd of
# fastuda/ops/pixel_contrast.py
PIXEL_CONTRAST.define_triton({"pixel_contrast_forward": _pixel_forward,
                              "pixel_contrast_backward": _pixel_backward})


def pixel_contrast_per_pixel(feats: Tensor, labels: Tensor, tau: float, ignore_index: int,
                             weights: Tensor | None, pair_weights: Tensor | None) -> Tensor:
    """Per-pixel supervised pixel-to-pixel contrast loss [B, P] (fp32; fp64 for fp64 feats).

    feats [B, D, P] already L2-normalised along D (any strides), labels [B, P] (any integer
    values; pixels equal to ignore_index take no part), weights / pair_weights [B, P] or None.
    0 at pixels that are not anchors (ignored, or without another pixel of their class).
    Differentiable w.r.t. feats and pair_weights."""
    op = "pixel_contrast_per_pixel"
    cc.check_feats(op, feats)
    cc.check_pixel_map(op, "labels", labels, feats, integer=True)
    cc.check_pixel_map(op, "weights", weights, feats, integer=False)
    cc.check_pixel_map(op, "pair_weights", pair_weights, feats, integer=False)
    cc.check_device(op, _pixel_fwd_kernel, feats, labels, weights, pair_weights)
    return torch.ops.fastuda_triton.pixel_contrast_forward(
        feats, labels, float(tau), int(ignore_index), weights, pair_weights)[0]
