"""Pixel-to-centroid contrast (ProtoCL) and its distributional upper bound (DistCL).

Public entry points ``proto_contrast`` and ``dist_contrast``; the compiled backends and their
autograd/fake registrations live here too (one op family, one file).
"""

from __future__ import annotations

from torch import Tensor

from . import _backend, reference
from .class_stats import _check_label_range

_BACKENDS: tuple[str, ...] = ("torch",)


def proto_contrast(feats: Tensor, labels: Tensor, centroids: Tensor, *, tau: float,
                   ignore_index: int = 255, weights: Tensor | None = None,
                   reduction: str = "mean", backend: str = "auto") -> Tensor:
    """InfoNCE of each valid pixel against the class centroids (ops.md section 3)."""
    _backend.check_feats("proto_contrast", feats)
    _backend.check_labels("proto_contrast", labels)
    labels_bp = _backend.as_bp(labels, feats)
    _check_centroids("proto_contrast", feats, centroids)
    which = _backend.resolve("proto_contrast", backend, feats.device, supported=_BACKENDS)
    _check_label_range(labels_bp, centroids.shape[0], ignore_index)
    assert which == "torch"
    return reference.proto_contrast(feats, labels, centroids, tau=tau, ignore_index=ignore_index,
                                    weights=weights, reduction=reduction)


def dist_contrast(feats: Tensor, labels: Tensor, centroids: Tensor, covariance: Tensor, *,
                  tau: float, lam: float = 1.0, ignore_index: int = 255,
                  weights: Tensor | None = None, reduction: str = "mean",
                  backend: str = "auto") -> Tensor:
    """Closed-form upper bound of the expected InfoNCE over Gaussian class concepts (section 4)."""
    _backend.check_feats("dist_contrast", feats)
    _backend.check_labels("dist_contrast", labels)
    labels_bp = _backend.as_bp(labels, feats)
    _check_centroids("dist_contrast", feats, centroids)
    which = _backend.resolve("dist_contrast", backend, feats.device, supported=_BACKENDS)
    _check_label_range(labels_bp, centroids.shape[0], ignore_index)
    assert which == "torch"
    return reference.dist_contrast(feats, labels, centroids, covariance, tau=tau, lam=lam,
                                   ignore_index=ignore_index, weights=weights,
                                   reduction=reduction)


def _check_centroids(op: str, feats: Tensor, centroids: Tensor) -> None:
    D = feats.shape[1]
    if centroids.dim() != 2 or centroids.shape[1] != D:
        raise ValueError(f"fastuda.ops.{op}: centroids shape {tuple(centroids.shape)} does not "
                         f"match the feature width D={D} of feats {tuple(feats.shape)}")
