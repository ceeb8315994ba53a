"""Label downscaling to feature resolution by majority vote (ops.md section 7)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _op, reference


def downscale_labels(labels: Tensor, factor: int, *, num_classes: int, min_ratio: float = 0.75,
                     ignore_index: int = 255, backend: str = "auto") -> Tensor:
    """Majority vote in each ``factor x factor`` cell of ``labels [B, H, W]`` -> ``[B, H/f, W/f]``.

    Ignore is its own candidate, ranked after every class; ties go to the lowest class id. A cell
    becomes ``ignore_index`` when the winner is ignore or covers less than ``min_ratio`` of it.
    The output has the labels' dtype. Labels outside ``[0, num_classes)`` that are not
    ``ignore_index`` are an error."""
    _backend.check_labels("downscale_labels", labels)
    if factor < 1:
        raise ValueError(f"fastuda.ops.downscale_labels: factor must be >= 1, got {factor}")
    if num_classes < 1:
        raise ValueError(f"fastuda.ops.downscale_labels: num_classes must be >= 1, got "
                         f"{num_classes}")
    if labels.dim() != 3:
        raise ValueError(f"fastuda.ops.downscale_labels: labels must be [B, H, W], got shape "
                         f"{tuple(labels.shape)}")
    _, H, W = labels.shape
    if H % factor or W % factor:
        raise ValueError(f"fastuda.ops.downscale_labels: labels {H}x{W} are not divisible by "
                         f"factor {factor}")
    which = DOWNSCALE_LABELS.dispatch(backend, labels.device, labels, num_classes, ignore_index)
    if which == "torch":
        return reference.downscale_labels(labels, factor, num_classes=num_classes,
                                          min_ratio=min_ratio, ignore_index=ignore_index)
    return torch.ops.fastuda.downscale_labels(labels, factor, num_classes, float(min_ratio),
                                              ignore_index)


def _downscale_labels_fake(labels: Tensor, factor: int, num_classes: int, min_ratio: float,
                           ignore_index: int) -> Tensor:
    B, H, W = labels.shape
    torch._check(H % factor == 0 and W % factor == 0,
                 lambda: f"labels {H}x{W} are not divisible by factor {factor}")
    return labels.new_empty(B, H // factor, W // factor)


# No Triton kernel (backend="triton" runs the compiled kernel of the tensor's device), no autograd.
DOWNSCALE_LABELS = _op.Op("downscale_labels", ("downscale_labels",), reference.downscale_labels,
                          {"downscale_labels": _downscale_labels_fake})
_op.register_compiled(DOWNSCALE_LABELS)
