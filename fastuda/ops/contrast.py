"""Pixel-to-centroid contrast (ProtoCL) and its distributional upper bound (DistCL).

Public entry points ``proto_contrast`` and ``dist_contrast``. The compiled kernels
(``torch.ops.fastuda.{proto,dist}_contrast_forward/backward``, C++ on CPU, CUDA on GPU) and the
Triton kernels (``torch.ops.fastuda_triton.*``, the same schemas) return the per-pixel loss
``[B, P]`` (weight applied, 0 at ignored pixels); this module checks the inputs, describes the ops
once (``PROTO_CONTRAST``, ``DIST_CONTRAST``: backends, reference, fake and autograd) and does the
reduction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _backend, _op, reference

_REDUCTIONS = ("mean", "sum", "none")


def proto_contrast(feats: Tensor, labels: Tensor, centroids: Tensor, *, tau: float,
                   ignore_index: int = 255, weights: Tensor | None = None,
                   reduction: str = "mean", backend: str = "auto") -> Tensor:
    """InfoNCE of each valid pixel against the class centroids (ops.md section 3).

    l_i = -log softmax_c(f_i . mu_c / tau)[y_i]. feats ``[N, D]`` or ``[B, D, H, W]`` (fp32, fp16,
    bf16), labels ``[N]`` / ``[B, H, W]`` of any integer dtype, centroids ``[C, D]``, weights (per
    pixel, no gradient) shaped like labels. ``reduction``: "mean" (sum of w_i l_i over the number
    of valid pixels), "sum", or "none" (per-pixel, shaped like labels, 0 at ignored pixels).
    The result is fp32 (fp64 for fp64 feats); gradients reach feats and centroids."""
    op = "proto_contrast"
    labels_bp, weights_bp = _check_common(op, feats, labels, centroids, weights, reduction, tau)
    which = PROTO_CONTRAST.dispatch(backend, feats.device, labels_bp, centroids.shape[0],
                                    ignore_index)
    if which == "torch":
        return reference.proto_contrast(feats, labels, centroids, tau=tau,
                                        ignore_index=ignore_index, weights=weights,
                                        reduction=reduction)
    per_pixel = PROTO_CONTRAST.kernel(which)(
        _backend.as_bdp(feats), labels_bp, centroids, float(tau), int(ignore_index),
        weights_bp, _keep_probs(which, feats, centroids))[0]
    return _reduce(per_pixel, labels_bp, labels.shape, ignore_index, reduction)


def dist_contrast(feats: Tensor, labels: Tensor, centroids: Tensor, covariance: Tensor, *,
                  tau: float, lam: float = 1.0, ignore_index: int = 255,
                  weights: Tensor | None = None, reduction: str = "mean",
                  backend: str = "auto") -> Tensor:
    """Closed-form upper bound of the expected InfoNCE over Gaussian class concepts (section 4).

    l_i = -f.mu_y/tau + log sum_c exp(f.mu_c/tau + lam/(2 tau^2) f^T Sigma_c f), covariance
    ``[C, D]`` (diagonal Sigma) or ``[C, D, D]`` (full). Other arguments as ``proto_contrast``;
    gradients reach feats, centroids and covariance."""
    op = "dist_contrast"
    labels_bp, weights_bp = _check_common(op, feats, labels, centroids, weights, reduction, tau)
    C, D = centroids.shape
    if covariance.dim() not in (2, 3) or tuple(covariance.shape) not in ((C, D), (C, D, D)):
        raise ValueError(f"fastuda.ops.{op}: covariance shape {tuple(covariance.shape)} must be "
                         f"[C, D] = [{C}, {D}] or [C, D, D] for centroids {tuple(centroids.shape)}")
    if not covariance.dtype.is_floating_point:
        raise TypeError(f"fastuda.ops.{op}: covariance must be floating point, "
                        f"got {covariance.dtype}")
    _backend.check_devices(op, feats, covariance=covariance)
    which = DIST_CONTRAST.dispatch(backend, feats.device, labels_bp, C, ignore_index)
    if which == "torch":
        return reference.dist_contrast(feats, labels, centroids, covariance, tau=tau, lam=lam,
                                       ignore_index=ignore_index, weights=weights,
                                       reduction=reduction)
    per_pixel = DIST_CONTRAST.kernel(which)(
        _backend.as_bdp(feats), labels_bp, centroids, covariance, float(tau), float(lam),
        int(ignore_index), weights_bp, _keep_probs(which, feats, centroids, covariance))[0]
    return _reduce(per_pixel, labels_bp, labels.shape, ignore_index, reduction)


def _keep_probs(which: str, *inputs: Tensor) -> bool:
    """Whether the forward keeps its softmax for the backward: the CPU kernel's option (the
    backward then skips the logit GEMMs; C / D of the features' memory), when a gradient will be
    asked for. The GPU kernels recompute it."""
    return which == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def _check_common(op: str, feats: Tensor, labels: Tensor, centroids: Tensor,
                  weights: Tensor | None, reduction: str, tau: float
                  ) -> tuple[Tensor, Tensor | None]:
    """Shared checks; returns labels (and detached weights) as [B, P] views matching feats."""
    _backend.check_feats(op, feats)
    _backend.check_labels(op, labels)
    _backend.check_devices(op, feats, centroids=centroids, weights=weights)
    labels_bp = _backend.as_bp(labels, feats)
    D = feats.shape[1]
    if centroids.dim() != 2 or centroids.shape[1] != D:
        raise ValueError(f"fastuda.ops.{op}: centroids shape {tuple(centroids.shape)} does not "
                         f"match the feature width D={D} of feats {tuple(feats.shape)}")
    if centroids.shape[0] < 1:
        raise ValueError(f"fastuda.ops.{op}: centroids {tuple(centroids.shape)} hold no class")
    if not centroids.dtype.is_floating_point:
        raise TypeError(f"fastuda.ops.{op}: centroids must be floating point, "
                        f"got {centroids.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fastuda.ops.{op}: reduction must be one of {_REDUCTIONS}, "
                         f"got {reduction!r}")
    if not tau > 0:
        raise ValueError(f"fastuda.ops.{op}: tau must be > 0, got {tau}")
    weights_bp = None
    if weights is not None:
        if not weights.dtype.is_floating_point:
            raise TypeError(f"fastuda.ops.{op}: weights must be floating point, "
                            f"got {weights.dtype}")
        weights_bp = _backend.as_bp(weights.detach(), feats, "weights")
    return labels_bp, weights_bp


def _reduce(per_pixel: Tensor, labels_bp: Tensor, shape: torch.Size, ignore_index: int,
            reduction: str) -> Tensor:
    if reduction == "none":
        return per_pixel.reshape(shape)
    if reduction == "sum":
        return per_pixel.sum()
    # mean over the valid pixels (a tensor: no host sync, compiles); 0 / 1 when there is none
    return per_pixel.sum() / (labels_bp != ignore_index).sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# fake (meta) and autograd implementations, shared by every namespace with these schemas
# ---------------------------------------------------------------------------------------------
def _fake_forward(feats: Tensor, centroids: Tensor, keep_probs: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
    B, _, P = feats.shape
    loss = feats.new_empty((B, P), dtype=_op.out_dtype(feats))
    probs = loss.new_empty((B, centroids.shape[0], P) if keep_probs else (0, 0, 0))
    return loss, torch.empty_like(loss), probs


def _fake_proto_forward(feats: Tensor, labels: Tensor, centroids: Tensor, tau: float,
                        ignore_index: int, weights: Tensor | None, keep_probs: bool = False
                        ) -> tuple[Tensor, Tensor, Tensor]:
    return _fake_forward(feats, centroids, keep_probs)


def _fake_dist_forward(feats: Tensor, labels: Tensor, centroids: Tensor, covariance: Tensor,
                       tau: float, lam: float, ignore_index: int, weights: Tensor | None,
                       keep_probs: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    return _fake_forward(feats, centroids, keep_probs)


def _fake_proto_backward(grad_loss: Tensor, feats: Tensor, labels: Tensor, centroids: Tensor,
                         lse: Tensor, tau: float, ignore_index: int, weights: Tensor | None,
                         centroids_grad: bool, probs: Tensor | None = None
                         ) -> tuple[Tensor, Tensor]:
    grad_feats = feats.new_empty(feats.shape)  # contiguous [B, D, P]
    grad_centroids = centroids.new_empty(centroids.shape if centroids_grad else (0,))
    return grad_feats, grad_centroids


def _fake_dist_backward(grad_loss: Tensor, feats: Tensor, labels: Tensor, centroids: Tensor,
                        covariance: Tensor, lse: Tensor, tau: float, lam: float,
                        ignore_index: int, weights: Tensor | None, stats_grad: bool,
                        probs: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    grad_feats = feats.new_empty(feats.shape)
    grad_centroids = centroids.new_empty(centroids.shape if stats_grad else (0,))
    grad_covariance = covariance.new_empty(covariance.shape if stats_grad else (0,))
    return grad_feats, grad_centroids, grad_covariance


def _proto_setup_context(ctx, inputs, output) -> None:
    feats, labels, centroids, tau, ignore_index, weights, *rest = inputs
    keep_probs = bool(rest and rest[0])  # a call may leave the schema's default out
    ctx.save_for_backward(feats, labels, centroids, weights, output[1],
                          output[2] if keep_probs else None)
    ctx.tau, ctx.ignore_index = tau, ignore_index
    ctx.mark_non_differentiable(output[1], output[2])


def _make_proto_backward(backward_op: Callable[..., tuple[Tensor, Tensor]]
                         ) -> Callable[..., tuple]:
    def backward(ctx, grad_loss: Tensor, _grad_lse: Tensor | None, _grad_probs: Tensor | None):
        feats, labels, centroids, weights, lse, probs = ctx.saved_tensors
        want_c = ctx.needs_input_grad[2]
        grad_feats, grad_centroids = backward_op(
            grad_loss, feats, labels, centroids, lse, ctx.tau, ctx.ignore_index, weights, want_c,
            probs)
        return (grad_feats if ctx.needs_input_grad[0] else None, None,
                grad_centroids if want_c else None, None, None, None, None)
    return backward


def _dist_setup_context(ctx, inputs, output) -> None:
    feats, labels, centroids, covariance, tau, lam, ignore_index, weights, *rest = inputs
    keep_probs = bool(rest and rest[0])
    ctx.save_for_backward(feats, labels, centroids, covariance, weights, output[1],
                          output[2] if keep_probs else None)
    ctx.tau, ctx.lam, ctx.ignore_index = tau, lam, ignore_index
    ctx.mark_non_differentiable(output[1], output[2])


def _make_dist_backward(backward_op: Callable[..., tuple[Tensor, Tensor, Tensor]]
                        ) -> Callable[..., tuple]:
    def backward(ctx, grad_loss: Tensor, _grad_lse: Tensor | None, _grad_probs: Tensor | None):
        feats, labels, centroids, covariance, weights, lse, probs = ctx.saved_tensors
        want_c, want_cov = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        grad_feats, grad_centroids, grad_covariance = backward_op(
            grad_loss, feats, labels, centroids, covariance, lse, ctx.tau, ctx.lam,
            ctx.ignore_index, weights, want_c or want_cov, probs)
        return (grad_feats if ctx.needs_input_grad[0] else None, None,
                grad_centroids if want_c else None, grad_covariance if want_cov else None,
                None, None, None, None, None)
    return backward


# The Triton kernels are in fastuda.ops.triton.contrast; they check label ranges in-kernel too.
PROTO_CONTRAST = _op.Op(
    "proto_contrast", ("proto_contrast_forward", "proto_contrast_backward"),
    reference.proto_contrast,
    {"proto_contrast_forward": _fake_proto_forward,
     "proto_contrast_backward": _fake_proto_backward},
    _op.Autograd("proto_contrast_forward", "proto_contrast_backward", _make_proto_backward,
                 _proto_setup_context),
    triton="fastuda.ops.triton.contrast",
    kernel_label_check=frozenset({"cpu", "cuda", "triton"}))
DIST_CONTRAST = _op.Op(
    "dist_contrast", ("dist_contrast_forward", "dist_contrast_backward"),
    reference.dist_contrast,
    {"dist_contrast_forward": _fake_dist_forward, "dist_contrast_backward": _fake_dist_backward},
    _op.Autograd("dist_contrast_forward", "dist_contrast_backward", _make_dist_backward,
                 _dist_setup_context),
    triton="fastuda.ops.triton.contrast",
    kernel_label_check=frozenset({"cpu", "cuda", "triton"}))
_op.register_compiled(PROTO_CONTRAST, DIST_CONTRAST)


def _supported(with_triton: bool) -> tuple[str, ...]:
    """The backends of both ops (they share their kernels' module): see Op.supported."""
    return PROTO_CONTRAST.supported(with_triton)
