"""Domain-adaptation methods: the shared self-training loop and one plug-in module per method."""

from __future__ import annotations

import torch

from ..config import Config
from .base import Method
from .sepico import SePiCo


def build_method(cfg: Config, *, embed_dim: int, device: torch.device) -> Method:
    """The method object for ``cfg.method.name`` ("none": plain self-training / source-only)."""
    name = cfg.method.name
    if name == "none":
        return Method()
    if name == "sepico":
        if embed_dim <= 0:
            raise ValueError("method.name = 'sepico' needs the projection head: set "
                             "model.projection = true")
        return SePiCo(cfg.method, num_classes=cfg.model.num_classes, embed_dim=embed_dim,
                      backend=cfg.ops.backend, device=device)
    raise ValueError(f"method.name = {name!r} is not implemented yet "
                     "(available: none, sepico)")


__all__ = ["Method", "SePiCo", "build_method"]
