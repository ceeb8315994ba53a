"""Pixel-to-pixel supervised contrast (CLUDA-style) with an online logsumexp over column tiles, so
the [N, N] similarity matrix is never stored (ops.md section 6)."""

from __future__ import annotations

from torch import Tensor

from . import _backend, reference

_BACKENDS: tuple[str, ...] = ("torch",)


def pixel_contrast(feats: Tensor, labels: Tensor, *, tau: float, weights: Tensor | None = None,
                   pair_weights: Tensor | None = None, ignore_index: int = 255,
                   reduction: str = "mean", backend: str = "auto") -> Tensor:
    _backend.check_feats("pixel_contrast", feats)
    _backend.check_labels("pixel_contrast", labels)
    _backend.as_bp(labels, feats)
    which = _backend.resolve("pixel_contrast", backend, feats.device, supported=_BACKENDS)
    assert which == "torch"
    return reference.pixel_contrast(feats, labels, tau=tau, weights=weights,
                                    pair_weights=pair_weights, ignore_index=ignore_index,
                                    reduction=reduction)
