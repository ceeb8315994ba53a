"""Triton kernels for pixel-to-centroid contrast (ProtoCL) and its distributional bound (DistCL).

Per pixel i with label y and feature f (ops.md sections 3-4):
    a_c = f.mu_c / tau,  b_c = lam / (2 tau^2) f^T Sigma_c f  (b = 0 for proto),
    l_i = w_i * (logsumexp_c(a_c + b_c) - a_y).

Layout: feats [B, D, P] with any strides (channels-first conv output viewed as [B, D, H*W], or an
[N, D] matrix viewed as [1, D, N]). One program owns BLOCK_P pixels of one image; it walks D in
BLOCK_D slices, loading a [BLOCK_D, BLOCK_P] feature tile (coalesced along whichever axis has unit
stride) and the matching [BLOCK_C, BLOCK_D] slice of the class tables, and accumulates the
[BLOCK_C, BLOCK_P] logits with tl.dot in fp32. The logits never leave registers; the forward
stores the per-pixel loss and logsumexp, the backward recomputes the logits from feats and reuses
the saved logsumexp. A full covariance [C, D, D] is applied tile by tile (Sigma_c slice
[BLOCK_D, BLOCK_D] x feature tile), never as an [N, C, D] tensor.

Gradients of the class tables (rare: centroids and covariances usually come detached from the
running statistics) go through a small [B, C, P] scratch of per-class pixel coefficients and
deterministic reduction kernels (no atomics).

This module also re-exports the bank and pixel-to-pixel kernels, so
``fastuda.ops.triton.contrast`` is the one import for the whole contrast family.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contrast import DIST_CONTRAST, PROTO_CONTRAST
from . import _contrast_common as cc
from .bank import bank_contrast_per_pixel
from .pixel import pixel_contrast_per_pixel

COV_NONE, COV_DIAG, COV_FULL = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _centroid_logits(f_ptr, sfb, sfd, sfp, b, offs_p, pmask,
                     mu_ptr, smc, smd, cov_ptr, scc, scd, sce,
                     D, C,
                     COV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_C: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """[BLOCK_C, BLOCK_P] tiles of f.mu_c and f^T Sigma_c f (zeros for COV_NONE)."""
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    dots = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    quad = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    f_base = f_ptr + b * sfb + offs_p[None, :] * sfp
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        f = tl.load(f_base + offs_d[:, None] * sfd, mask=dmask[:, None] & pmask[None, :],
                    other=0.0).to(ACC)
        tmask = cmask[:, None] & dmask[None, :]
        mu = tl.load(mu_ptr + offs_c[:, None] * smc + offs_d[None, :] * smd, mask=tmask,
                     other=0.0).to(ACC)
        dots += tl.dot(mu, f, input_precision=PREC, out_dtype=ACC)
        if COV == 1:
            var = tl.load(cov_ptr + offs_c[:, None] * scc + offs_d[None, :] * scd, mask=tmask,
                          other=0.0).to(ACC)
            quad += tl.dot(var, f * f, input_precision=PREC, out_dtype=ACC)
    if COV == 2:
        # q_c = sum_d f_d (Sigma_c f)_d, one [BLOCK_D, BLOCK_D] slice of Sigma_c at a time
        for c in range(0, C):
            q_c = tl.zeros((BLOCK_P,), dtype=ACC)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                dmask = offs_d < D
                f_d = tl.load(f_base + offs_d[:, None] * sfd,
                              mask=dmask[:, None] & pmask[None, :], other=0.0).to(ACC)
                sig_f = tl.zeros((BLOCK_D, BLOCK_P), dtype=ACC)
                for e0 in range(0, D, BLOCK_D):
                    offs_e = e0 + tl.arange(0, BLOCK_D)
                    emask = offs_e < D
                    f_e = tl.load(f_base + offs_e[:, None] * sfd,
                                  mask=emask[:, None] & pmask[None, :], other=0.0).to(ACC)
                    sig = tl.load(cov_ptr + c * scc + offs_d[:, None] * scd
                                  + offs_e[None, :] * sce,
                                  mask=dmask[:, None] & emask[None, :], other=0.0).to(ACC)
                    sig_f += tl.dot(sig, f_e, input_precision=PREC, out_dtype=ACC)
                q_c += tl.sum(f_d * sig_f, axis=0)
            quad = tl.where(offs_c[:, None] == c, q_c[None, :], quad)
    return dots, quad


@triton.jit
def _centroid_fwd_kernel(
        f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, w_ptr, swb, swp,
        mu_ptr, smc, smd, cov_ptr, scc, scd, sce,
        loss_ptr, lse_ptr, err_ptr,
        P, D, C, ignore_index, inv_tau, quad_scale,
        COV: tl.constexpr, HAS_W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_C: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    y, valid = cc.labels_tile(y_ptr, syb, syp, b, offs_p, pmask, C, ignore_index, err_ptr, True)
    dots, quad = _centroid_logits(f_ptr, sfb, sfd, sfp, b, offs_p, pmask, mu_ptr, smc, smd,
                                  cov_ptr, scc, scd, sce, D, C, COV, BLOCK_P, BLOCK_D, BLOCK_C,
                                  ACC, PREC)
    offs_c = tl.arange(0, BLOCK_C)
    a = dots * inv_tau
    z = tl.where((offs_c < C)[:, None], a + quad * quad_scale, float("-inf"))
    m = tl.max(z, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    lse = m + tl.log(tl.sum(tl.exp(z - m[None, :]), axis=0))
    a_y = tl.sum(tl.where(offs_c[:, None] == y[None, :], a, 0.0), axis=0)
    loss = lse - a_y
    if HAS_W:
        loss = loss * tl.load(w_ptr + b * swb + offs_p * swp, mask=pmask, other=0.0).to(ACC)
    out = b * P + offs_p
    tl.store(loss_ptr + out, tl.where(valid, loss, 0.0), mask=pmask)
    tl.store(lse_ptr + out, tl.where(valid, lse, 0.0), mask=pmask)


@triton.jit
def _centroid_bwd_kernel(
        g_ptr, sgb, sgp, f_ptr, sfb, sfd, sfp, y_ptr, syb, syp, w_ptr, swb, swp,
        mu_ptr, smc, smd, cov_ptr, scc, scd, sce, sym_ptr, lse_ptr,
        df_ptr, ga_ptr, gq_ptr, err_ptr,
        P, D, C, ignore_index, inv_tau, quad_scale,
        COV: tl.constexpr, HAS_W: tl.constexpr, STATS_GRAD: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    y, valid = cc.labels_tile(y_ptr, syb, syp, b, offs_p, pmask, C, ignore_index, err_ptr, False)
    dots, quad = _centroid_logits(f_ptr, sfb, sfd, sfp, b, offs_p, pmask, mu_ptr, smc, smd,
                                  cov_ptr, scc, scd, sce, D, C, COV, BLOCK_P, BLOCK_D, BLOCK_C,
                                  ACC, PREC)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    lse = tl.load(lse_ptr + b * P + offs_p, mask=pmask, other=0.0)
    z = tl.where(cmask[:, None], dots * inv_tau + quad * quad_scale, float("-inf"))
    # lse is saved as 0 at pixels that do not count: keep exp() there from overflowing (inf * 0)
    prob = tl.exp(tl.where(valid[None, :], z - lse[None, :], float("-inf")))
    g = tl.load(g_ptr + b * sgb + offs_p * sgp, mask=pmask, other=0.0).to(ACC)
    if HAS_W:
        g = g * tl.load(w_ptr + b * swb + offs_p * swp, mask=pmask, other=0.0).to(ACC)
    g = tl.where(valid, g, 0.0)
    onehot = (offs_c[:, None] == y[None, :]).to(ACC)
    # dl/d(f.mu_c) and dl/d(f^T Sigma_c f), both [BLOCK_C, BLOCK_P]
    g_dot = tl.where(cmask[:, None], g[None, :] * (prob - onehot) * inv_tau, 0.0)
    g_quad = tl.where(cmask[:, None], g[None, :] * prob * quad_scale, 0.0)
    if STATS_GRAD:
        scratch = b * C * P + offs_c[:, None] * P + offs_p[None, :]
        smask = cmask[:, None] & pmask[None, :]
        tl.store(ga_ptr + scratch, g_dot, mask=smask)
        tl.store(gq_ptr + scratch, g_quad, mask=smask)
    f_base = f_ptr + b * sfb + offs_p[None, :] * sfp
    df_base = df_ptr + b * D * P + offs_p[None, :]
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        tmask = dmask[:, None] & cmask[None, :]
        # class tables loaded transposed: [BLOCK_D, BLOCK_C]
        mu_t = tl.load(mu_ptr + offs_c[None, :] * smc + offs_d[:, None] * smd, mask=tmask,
                       other=0.0).to(ACC)
        df = tl.dot(mu_t, g_dot, input_precision=PREC, out_dtype=ACC)
        if COV == 1:
            f = tl.load(f_base + offs_d[:, None] * sfd, mask=dmask[:, None] & pmask[None, :],
                        other=0.0).to(ACC)
            var_t = tl.load(cov_ptr + offs_c[None, :] * scc + offs_d[:, None] * scd, mask=tmask,
                            other=0.0).to(ACC)
            df += 2.0 * f * tl.dot(var_t, g_quad, input_precision=PREC, out_dtype=ACC)
        if COV == 2:
            # d(f^T S f)/df = (S + S^T) f; sym_ptr holds S + S^T, contiguous [C, D, D]
            for c in range(0, C):
                g_c = tl.sum(tl.where(offs_c[:, None] == c, g_quad, 0.0), axis=0)
                sym_f = tl.zeros((BLOCK_D, BLOCK_P), dtype=ACC)
                for e0 in range(0, D, BLOCK_D):
                    offs_e = e0 + tl.arange(0, BLOCK_D)
                    emask = offs_e < D
                    f_e = tl.load(f_base + offs_e[:, None] * sfd,
                                  mask=emask[:, None] & pmask[None, :], other=0.0).to(ACC)
                    sym = tl.load(sym_ptr + c * D * D + offs_d[:, None] * D + offs_e[None, :],
                                  mask=dmask[:, None] & emask[None, :], other=0.0).to(ACC)
                    sym_f += tl.dot(sym, f_e, input_precision=PREC, out_dtype=ACC)
                df += sym_f * g_c[None, :]
        tl.store(df_base + offs_d[:, None] * P, df.to(df_ptr.dtype.element_ty),
                 mask=dmask[:, None] & pmask[None, :])


@triton.jit
def _class_feature_sum_kernel(
        g_ptr, f_ptr, sfb, sfd, sfp, out_ptr, P, D, C, n_ptiles, n_tiles,
        SQUARE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_C: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """out[split, c, d] = sum over this split's pixel tiles of g[b, c, p] * f[b, d, p]^(1 or 2).

    Grid (D slices, splits); each split walks tiles split, split + n_splits, ... in a fixed
    order, and the host sums the splits: deterministic, no atomics."""
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)
    for t in range(split, n_tiles, n_splits):
        b = t // n_ptiles
        offs_p = (t % n_ptiles) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        g = tl.load(g_ptr + b * C * P + offs_c[:, None] * P + offs_p[None, :],
                    mask=cmask[:, None] & pmask[None, :], other=0.0)
        f_t = tl.load(f_ptr + b * sfb + offs_p[:, None] * sfp + offs_d[None, :] * sfd,
                      mask=pmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        if SQUARE:
            f_t = f_t * f_t
        acc += tl.dot(g, f_t, input_precision=PREC, out_dtype=ACC)
    tl.store(out_ptr + split * C * D + offs_c[:, None] * D + offs_d[None, :], acc,
             mask=cmask[:, None] & dmask[None, :])


@triton.jit
def _class_gram_kernel(
        g_ptr, f_ptr, sfb, sfd, sfp, out_ptr, B, P, D, C,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """out[c, d, e] = sum_{b, p} g[b, c, p] f[b, d, p] f[b, e, p]; grid (C, D slices, D slices)."""
    c = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_e = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    emask = offs_e < D
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    for b in range(0, B):
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            pmask = offs_p < P
            g = tl.load(g_ptr + b * C * P + c * P + offs_p, mask=pmask, other=0.0)
            f_d = tl.load(f_ptr + b * sfb + offs_d[:, None] * sfd + offs_p[None, :] * sfp,
                          mask=dmask[:, None] & pmask[None, :], other=0.0).to(ACC)
            f_e = tl.load(f_ptr + b * sfb + offs_p[:, None] * sfp + offs_e[None, :] * sfd,
                          mask=pmask[:, None] & emask[None, :], other=0.0).to(ACC)
            acc += tl.dot(f_d * g[None, :], f_e, input_precision=PREC, out_dtype=ACC)
    tl.store(out_ptr + c * D * D + offs_d[:, None] * D + offs_e[None, :], acc,
             mask=dmask[:, None] & emask[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------
def _config(feats: Tensor, C: int, cov_kind: int) -> dict[str, int]:
    block_c = cc.pow2(C)
    if cc.interpreting(_centroid_fwd_kernel):
        # small tiles so that the tests cross tile borders on small shapes
        return {"BLOCK_P": 16, "BLOCK_D": 16, "BLOCK_C": block_c, "num_warps": 4}
    # sm_90 (ptxas -v): with BLOCK_C = 32 these stay at 100-150 registers without spills; the
    # D loop is software-pipelined by Triton, so the feature stream needs no larger tiles
    if cov_kind == COV_FULL:
        return {"BLOCK_P": 64, "BLOCK_D": 32, "BLOCK_C": block_c, "num_warps": 8}
    return {"BLOCK_P": 64 if block_c <= 32 else 32, "BLOCK_D": 32, "BLOCK_C": block_c,
            "num_warps": 8}


def _cov_kind(covariance: Tensor | None) -> int:
    if covariance is None:
        return COV_NONE
    return COV_DIAG if covariance.dim() == 2 else COV_FULL


def _cov_strides(covariance: Tensor | None) -> tuple[int, int, int]:
    if covariance is None:
        return 0, 0, 0
    if covariance.dim() == 2:
        return covariance.stride(0), covariance.stride(1), 0
    return covariance.stride(0), covariance.stride(1), covariance.stride(2)


# ----------------------------------------------------------------------------------------------
# Implementations of the proto/dist_contrast_forward/backward schemas (csrc/ops_schema.h),
# registered as torch.ops.fastuda_triton.* by the op descriptors (fastuda/ops/contrast.py), which
# also give them their fake and autograd implementations.
# ----------------------------------------------------------------------------------------------
def _no_probs(op: str, keep_probs: bool, probs: Tensor | None) -> None:
    """keep_probs / probs are the CPU kernels' option; these kernels recompute the softmax."""
    if keep_probs or probs is not None:
        raise ValueError(f"fastuda_triton::{op}: keep_probs / probs are a CPU kernel option; "
                         "the Triton kernels recompute the softmax")


def _centroid_forward(feats: Tensor, labels: Tensor, centroids: Tensor, covariance: Tensor | None,
                      tau: float, lam: float, ignore_index: int, weights: Tensor | None,
                      keep_probs: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    _no_probs("dist_contrast_forward" if covariance is not None else "proto_contrast_forward",
              keep_probs, None)
    B, D, P = feats.shape
    C = centroids.shape[0]
    acc = cc.acc_torch_dtype(feats)
    loss = torch.empty((B, P), dtype=acc, device=feats.device)
    lse = torch.empty((B, P), dtype=acc, device=feats.device)
    no_probs = torch.empty((0, 0, 0), dtype=acc, device=feats.device)
    if B * P == 0:
        return loss, lse, no_probs
    cov_kind = _cov_kind(covariance)
    cfg = _config(feats, C, cov_kind)
    err = cc.new_label_error(feats)
    grid = (triton.cdiv(P, cfg["BLOCK_P"]), B)
    _centroid_fwd_kernel[grid](
        feats, *feats.stride(), labels, *labels.stride(),
        cc.dummy(feats) if weights is None else weights, *cc.strides2(weights),
        centroids, *centroids.stride(),
        cc.dummy(feats) if covariance is None else covariance, *_cov_strides(covariance),
        loss, lse, err,
        P, D, C, ignore_index, 1.0 / tau, lam / (2.0 * tau * tau),
        COV=cov_kind, HAS_W=weights is not None, ACC=cc.acc_tl_dtype(feats),
        PREC=cc.dot_precision(_centroid_fwd_kernel, feats), **cfg)
    cc.raise_label_error("centroid_contrast", err, C, ignore_index)
    return loss, lse, no_probs


def _centroid_backward(grad_loss: Tensor, feats: Tensor, labels: Tensor, centroids: Tensor,
                       covariance: Tensor | None, lse: Tensor, tau: float, lam: float,
                       ignore_index: int, weights: Tensor | None, stats_grad: bool,
                       probs: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_feats [B, D, P], grad_centroids [C, D], grad_covariance) ; the two class-table
    gradients are empty tensors unless ``stats_grad``."""
    _no_probs("dist_contrast_backward" if covariance is not None else "proto_contrast_backward",
              False, probs)
    B, D, P = feats.shape
    C = centroids.shape[0]
    acc = cc.acc_torch_dtype(feats)
    dev = feats.device
    grad_feats = torch.empty((B, D, P), dtype=feats.dtype, device=dev)
    # empty class-table gradients as the compiled ops (and the shared fakes) give them
    grad_mu = (torch.zeros(centroids.shape, dtype=centroids.dtype, device=dev) if stats_grad
               else centroids.new_empty(0))
    grad_cov = (torch.zeros(covariance.shape, dtype=covariance.dtype, device=dev)
                if stats_grad and covariance is not None
                else (feats if covariance is None else covariance).new_empty(0))
    if B * P == 0 or D == 0:
        return grad_feats, grad_mu, grad_cov
    cov_kind = _cov_kind(covariance)
    cfg = _config(feats, C, cov_kind)
    acc_tl = cc.acc_tl_dtype(feats)
    prec = cc.dot_precision(_centroid_bwd_kernel, feats)
    sym = None
    if cov_kind == COV_FULL:
        cov_acc = covariance.to(acc)
        sym = (cov_acc + cov_acc.transpose(1, 2)).contiguous()
    if stats_grad:
        g_dot = torch.empty((B, C, P), dtype=acc, device=dev)
        g_quad = torch.empty((B, C, P), dtype=acc, device=dev)
    else:
        g_dot = g_quad = cc.dummy(feats)
    grid = (triton.cdiv(P, cfg["BLOCK_P"]), B)
    _centroid_bwd_kernel[grid](
        grad_loss, *grad_loss.stride(), feats, *feats.stride(), labels, *labels.stride(),
        cc.dummy(feats) if weights is None else weights, *cc.strides2(weights),
        centroids, *centroids.stride(),
        cc.dummy(feats) if covariance is None else covariance, *_cov_strides(covariance),
        cc.dummy(feats) if sym is None else sym, lse,
        grad_feats, g_dot, g_quad, cc.new_label_error(feats),
        P, D, C, ignore_index, 1.0 / tau, lam / (2.0 * tau * tau),
        COV=cov_kind, HAS_W=weights is not None, STATS_GRAD=stats_grad, ACC=acc_tl, PREC=prec,
        **cfg)
    if not stats_grad:
        return grad_feats, grad_mu, grad_cov
    grad_mu.copy_(_class_feature_sum(g_dot, feats, C, False, cfg, acc_tl, prec))
    if cov_kind == COV_DIAG:
        grad_cov.copy_(_class_feature_sum(g_quad, feats, C, True, cfg, acc_tl, prec))
    elif cov_kind == COV_FULL:
        gram = torch.empty((C, D, D), dtype=acc, device=dev)
        block_d = cfg["BLOCK_D"]
        _class_gram_kernel[(C, triton.cdiv(D, block_d), triton.cdiv(D, block_d))](
            g_quad, feats, *feats.stride(), gram, B, P, D, C,
            BLOCK_P=cfg["BLOCK_P"], BLOCK_D=block_d, ACC=acc_tl, PREC=prec,
            num_warps=cfg["num_warps"])
        grad_cov.copy_(gram)
    return grad_feats, grad_mu, grad_cov


def _class_feature_sum(g: Tensor, feats: Tensor, C: int, square: bool, cfg: dict[str, int],
                       acc_tl: tl.dtype, prec: str) -> Tensor:
    B, D, P = feats.shape
    n_ptiles = triton.cdiv(P, cfg["BLOCK_P"])
    n_tiles = B * n_ptiles
    n_splits = min(n_tiles, 4 if cc.interpreting(_class_feature_sum_kernel) else 128)
    partial = torch.empty((n_splits, C, D), dtype=g.dtype, device=g.device)
    _class_feature_sum_kernel[(triton.cdiv(D, cfg["BLOCK_D"]), n_splits)](
        g, feats, *feats.stride(), partial, P, D, C, n_ptiles, n_tiles,
        SQUARE=square, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], BLOCK_C=cfg["BLOCK_C"],
        ACC=acc_tl, PREC=prec, num_warps=cfg["num_warps"])
    return partial.sum(0)


def _proto_forward(feats: Tensor, labels: Tensor, centroids: Tensor, tau: float,
                   ignore_index: int, weights: Tensor | None, keep_probs: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor]:
    return _centroid_forward(feats, labels, centroids, None, tau, 0.0, ignore_index, weights,
                             keep_probs)


def _proto_backward(grad_loss: Tensor, feats: Tensor, labels: Tensor, centroids: Tensor,
                    lse: Tensor, tau: float, ignore_index: int, weights: Tensor | None,
                    centroids_grad: bool, probs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    grad_feats, grad_mu, _ = _centroid_backward(grad_loss, feats, labels, centroids, None, lse,
                                                tau, 0.0, ignore_index, weights, centroids_grad,
                                                probs)
    return grad_feats, grad_mu


PROTO_CONTRAST.define_triton({"proto_contrast_forward": _proto_forward,
                              "proto_contrast_backward": _proto_backward})
DIST_CONTRAST.define_triton({"dist_contrast_forward": _centroid_forward,
                             "dist_contrast_backward": _centroid_backward})


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def proto_contrast_per_pixel(feats: Tensor, labels: Tensor, centroids: Tensor, tau: float,
                             ignore_index: int, weights: Tensor | None) -> Tensor:
    """Per-pixel ProtoCL loss [B, P] (fp32; fp64 for fp64 feats): w_i * l_i, 0 where not counted.

    feats [B, D, P] (any strides), labels [B, P] integer, centroids [C, D], weights [B, P] or
    None. Differentiable w.r.t. feats and centroids."""
    _check_centroid_inputs("proto_contrast_per_pixel", feats, labels, centroids, None, weights)
    return torch.ops.fastuda_triton.proto_contrast_forward(
        feats, labels, centroids, float(tau), int(ignore_index), weights)[0]


def dist_contrast_per_pixel(feats: Tensor, labels: Tensor, centroids: Tensor, covariance: Tensor,
                            tau: float, lam: float, ignore_index: int,
                            weights: Tensor | None) -> Tensor:
    """Per-pixel DistCL loss [B, P]; covariance [C, D] (diagonal) or [C, D, D] (full).

    Differentiable w.r.t. feats, centroids and covariance."""
    _check_centroid_inputs("dist_contrast_per_pixel", feats, labels, centroids, covariance,
                           weights)
    return torch.ops.fastuda_triton.dist_contrast_forward(
        feats, labels, centroids, covariance, float(tau), float(lam), int(ignore_index),
        weights)[0]


def _check_centroid_inputs(op: str, feats: Tensor, labels: Tensor, centroids: Tensor,
                           covariance: Tensor | None, weights: Tensor | None) -> None:
    _, D, _ = cc.check_feats(op, feats)
    cc.check_pixel_map(op, "labels", labels, feats, integer=True)
    cc.check_pixel_map(op, "weights", weights, feats, integer=False)
    if centroids.dim() != 2 or centroids.shape[1] != D:
        raise ValueError(f"fastuda_triton.{op}: centroids shape {tuple(centroids.shape)} does not "
                         f"match feats shape {tuple(feats.shape)} (expected [C, {D}])")
    if not centroids.dtype.is_floating_point:
        raise TypeError(f"fastuda_triton.{op}: centroids must be floating, got {centroids.dtype}")
    if covariance is not None:
        C = centroids.shape[0]
        if tuple(covariance.shape) not in ((C, D), (C, D, D)):
            raise ValueError(f"fastuda_triton.{op}: covariance shape {tuple(covariance.shape)} "
                             f"does not match centroids shape {tuple(centroids.shape)} "
                             f"(expected [{C}, {D}] or [{C}, {D}, {D}])")
        if not covariance.dtype.is_floating_point:
            raise TypeError(f"fastuda_triton.{op}: covariance must be floating, "
                            f"got {covariance.dtype}")
    cc.check_device(op, _centroid_fwd_kernel, feats, labels, centroids, covariance, weights)


__all__ = ["bank_contrast_per_pixel", "dist_contrast_per_pixel", "pixel_contrast_per_pixel",
           "proto_contrast_per_pixel"]
