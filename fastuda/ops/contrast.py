"""Pixel-to-centroid contrast (ProtoCL) and its distributional upper bound (DistCL).

Public entry points ``proto_contrast`` and ``dist_contrast``. The compiled kernels
(``torch.ops.fastuda.{proto,dist}_contrast_forward/backward``, C++ on CPU, CUDA on GPU) and the
Triton kernels return the per-pixel loss ``[B, P]`` (weight applied, 0 at ignored pixels); this
module checks the inputs, picks the backend, registers the compiled ops' autograd and fake (meta)
implementations and does the reduction.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from . import _backend, reference
from .class_stats import _check_label_range

_BACKENDS: tuple[str, ...] = ("cpu", "cuda", "torch")
_REDUCTIONS = ("mean", "sum", "none")
_supported_cache: dict[bool, tuple[str, ...]] = {}


@torch.compiler.assume_constant_result
def _supported(with_triton: bool) -> tuple[str, ...]:
    """The backends of these ops: cpu/cuda when the extension registered a kernel, the reference,
    and "triton" when fastuda.ops.triton.contrast provides the per-pixel functions. Triton is
    looked up only when asked for, because importing it must not happen before a test has
    switched on its interpreter. Computed once; a constant under torch.compile."""
    if with_triton in _supported_cache:
        return _supported_cache[with_triton]
    out = ["torch"]
    for name, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if _backend.extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
                "fastuda::proto_contrast_forward", key):
            out.append(name)
    if with_triton:
        try:
            mod = importlib.import_module("fastuda.ops.triton.contrast")
            if hasattr(mod, "proto_contrast_per_pixel") and hasattr(mod,
                                                                    "dist_contrast_per_pixel"):
                out.append("triton")
        except ImportError:
            pass
    _supported_cache[with_triton] = tuple(b for b in (*_BACKENDS, "triton") if b in out)
    return _supported_cache[with_triton]


def _resolve(op: str, backend: str, feats: Tensor) -> str:
    want_triton = backend == "triton" or (backend == "auto" and feats.device.type == "cuda")
    return _backend.resolve(op, backend, feats.device, supported=_supported(want_triton))


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
    which = _resolve(op, backend, feats)
    if which == "torch":
        _check_label_range(labels_bp, centroids.shape[0], ignore_index)
        return reference.proto_contrast(feats, labels, centroids, tau=tau,
                                        ignore_index=ignore_index, weights=weights,
                                        reduction=reduction)
    feats_bdp = _backend.as_bdp(feats)
    if which == "triton":
        from .triton import contrast as triton_contrast
        per_pixel = triton_contrast.proto_contrast_per_pixel(
            feats_bdp, labels_bp, centroids, float(tau), int(ignore_index), weights_bp)
    else:
        per_pixel = torch.ops.fastuda.proto_contrast_forward(
            feats_bdp, labels_bp, centroids, float(tau), int(ignore_index), weights_bp)[0]
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
    which = _resolve(op, backend, feats)
    if which == "torch":
        _check_label_range(labels_bp, C, ignore_index)
        return reference.dist_contrast(feats, labels, centroids, covariance, tau=tau, lam=lam,
                                       ignore_index=ignore_index, weights=weights,
                                       reduction=reduction)
    feats_bdp = _backend.as_bdp(feats)
    if which == "triton":
        from .triton import contrast as triton_contrast
        per_pixel = triton_contrast.dist_contrast_per_pixel(
            feats_bdp, labels_bp, centroids, covariance, float(tau), float(lam),
            int(ignore_index), weights_bp)
    else:
        per_pixel = torch.ops.fastuda.dist_contrast_forward(
            feats_bdp, labels_bp, centroids, covariance, float(tau), float(lam),
            int(ignore_index), weights_bp)[0]
    return _reduce(per_pixel, labels_bp, labels.shape, ignore_index, reduction)


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
# autograd and fake (meta) implementations of the compiled ops
# ---------------------------------------------------------------------------------------------
def _out_dtype(feats: Tensor) -> torch.dtype:
    return torch.float64 if feats.dtype == torch.float64 else torch.float32


def _fake_forward(feats: Tensor, labels: Tensor, centroids: Tensor, *args) -> tuple[Tensor, Tensor]:
    B, _, P = feats.shape
    loss = feats.new_empty((B, P), dtype=_out_dtype(feats))
    return loss, torch.empty_like(loss)


def _fake_proto_backward(grad_loss: Tensor, feats: Tensor, labels: Tensor, centroids: Tensor,
                         lse: Tensor, tau: float, ignore_index: int, weights: Tensor | None,
                         centroids_grad: bool) -> tuple[Tensor, Tensor]:
    grad_feats = feats.new_empty(feats.shape)  # contiguous [B, D, P]
    grad_centroids = centroids.new_empty(centroids.shape if centroids_grad else (0,))
    return grad_feats, grad_centroids


def _fake_dist_backward(grad_loss: Tensor, feats: Tensor, labels: Tensor, centroids: Tensor,
                        covariance: Tensor, lse: Tensor, tau: float, lam: float,
                        ignore_index: int, weights: Tensor | None,
                        stats_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    grad_feats = feats.new_empty(feats.shape)
    grad_centroids = centroids.new_empty(centroids.shape if stats_grad else (0,))
    grad_covariance = covariance.new_empty(covariance.shape if stats_grad else (0,))
    return grad_feats, grad_centroids, grad_covariance


def _proto_setup_context(ctx, inputs, output) -> None:
    feats, labels, centroids, tau, ignore_index, weights = inputs
    ctx.save_for_backward(feats, labels, centroids, weights, output[1])
    ctx.tau, ctx.ignore_index = tau, ignore_index
    ctx.mark_non_differentiable(output[1])


def _proto_backward(ctx, grad_loss: Tensor, _grad_lse: Tensor | None):
    feats, labels, centroids, weights, lse = ctx.saved_tensors
    want_c = ctx.needs_input_grad[2]
    grad_feats, grad_centroids = torch.ops.fastuda.proto_contrast_backward(
        grad_loss, feats, labels, centroids, lse, ctx.tau, ctx.ignore_index, weights, want_c)
    return (grad_feats if ctx.needs_input_grad[0] else None, None,
            grad_centroids if want_c else None, None, None, None)


def _dist_setup_context(ctx, inputs, output) -> None:
    feats, labels, centroids, covariance, tau, lam, ignore_index, weights = inputs
    ctx.save_for_backward(feats, labels, centroids, covariance, weights, output[1])
    ctx.tau, ctx.lam, ctx.ignore_index = tau, lam, ignore_index
    ctx.mark_non_differentiable(output[1])


def _dist_backward(ctx, grad_loss: Tensor, _grad_lse: Tensor | None):
    feats, labels, centroids, covariance, weights, lse = ctx.saved_tensors
    want_c, want_cov = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    grad_feats, grad_centroids, grad_covariance = torch.ops.fastuda.dist_contrast_backward(
        grad_loss, feats, labels, centroids, covariance, lse, ctx.tau, ctx.lam,
        ctx.ignore_index, weights, want_c or want_cov)
    return (grad_feats if ctx.needs_input_grad[0] else None, None,
            grad_centroids if want_c else None, grad_covariance if want_cov else None,
            None, None, None, None)


if _backend.extension_available():
    torch.library.register_fake("fastuda::proto_contrast_forward")(_fake_forward)
    torch.library.register_fake("fastuda::dist_contrast_forward")(_fake_forward)
    torch.library.register_fake("fastuda::proto_contrast_backward")(_fake_proto_backward)
    torch.library.register_fake("fastuda::dist_contrast_backward")(_fake_dist_backward)
    torch.library.register_autograd("fastuda::proto_contrast_forward", _proto_backward,
                                    setup_context=_proto_setup_context)
    torch.library.register_autograd("fastuda::dist_contrast_forward", _dist_backward,
                                    setup_context=_dist_setup_context)
