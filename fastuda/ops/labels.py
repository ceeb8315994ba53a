"""Label downscaling to feature resolution by majority vote (ops.md section 7)."""

from __future__ import annotations

from torch import Tensor

from . import _backend, reference

_BACKENDS: tuple[str, ...] = ("torch",)


def downscale_labels(labels: Tensor, factor: int, *, num_classes: int, min_ratio: float = 0.75,
                     ignore_index: int = 255, backend: str = "auto") -> Tensor:
    _backend.check_labels("downscale_labels", labels)
    if factor < 1:
        raise ValueError(f"fastuda.ops.downscale_labels: factor must be >= 1, got {factor}")
    which = _backend.resolve("downscale_labels", backend, labels.device, supported=_BACKENDS)
    assert which == "torch"
    return reference.downscale_labels(labels, factor, num_classes=num_classes,
                                      min_ratio=min_ratio, ignore_index=ignore_index)
