"""Domain-adaptation methods: the shared self-training loop and one plug-in module per method."""

from __future__ import annotations

import torch

from ..config import Config, ConfigError
from .base import Method
from .bipcl import BiPCL
from .cluda import CLUDA
from .corda import CorDA, CorDAModel
from .sepico import SePiCo
from .spcl import SPCL

METHODS = ("none", "sepico", "cluda", "spcl", "bipcl", "corda")


def build_method(cfg: Config, *, embed_dim: int, device: torch.device,
                 feature_channels: int = 0) -> Method:
    """The method object for ``cfg.method.name`` ("none": plain self-training / source-only).
    ``feature_channels``: the channels of the network's ``"features"`` (needed by CLUDA in HRDA
    mode, whose pair-weight head reads them)."""
    name = cfg.method.name
    num_classes, backend = cfg.model.num_classes, cfg.ops.backend
    if name in ("sepico", "spcl", "bipcl") and embed_dim <= 0:
        raise ConfigError(f"method.name = {name!r} needs the projection head (embeddings): set "
                          "model.projection = true")
    if name in ("cluda", "spcl", "bipcl", "corda") and not cfg.self_training.enabled:
        raise ConfigError(f"method.name = {name!r} adapts with the self-training loop: set "
                          "self_training.enabled = true")
    if name == "none":
        return Method()
    if name == "sepico":
        return SePiCo(cfg.method, num_classes=num_classes, embed_dim=embed_dim, backend=backend,
                      device=device)
    if name == "cluda":
        if cfg.self_training.mix != "classmix":
            raise ConfigError("method.name = 'cluda' contrasts the mixed batch: set "
                              "self_training.mix = 'classmix'")
        if not cfg.hrda.enabled:
            return CLUDA(cfg.method, num_classes=num_classes, backend=backend)
        if feature_channels <= 0:
            raise ConfigError("method.name = 'cluda' with hrda.enabled builds a pair-weight head "
                              "on the features: pass build_method(feature_channels=...)")
        # the learned multi-resolution weighting: CLUDA's own head, as wide as HRDA's attention
        return CLUDA(cfg.method, num_classes=num_classes, backend=backend,
                     feature_channels=feature_channels,
                     head_channels=cfg.hrda.attention_channels)
    if name == "spcl":
        return SPCL(cfg.method, num_classes=num_classes, embed_dim=embed_dim, backend=backend,
                    device=device)
    if name == "bipcl":
        return BiPCL(cfg.method, num_classes=num_classes, embed_dim=embed_dim, backend=backend,
                     device=device)
    if name == "corda":
        if cfg.self_training.class_balanced_crop:
            raise ConfigError("method.name = 'corda' reads depth crops made by the loader: set "
                              "self_training.class_balanced_crop = false")
        return CorDA(cfg.method, num_classes=num_classes)
    raise ConfigError(f"method.name = {name!r} is not implemented (available: "
                      f"{', '.join(METHODS)})")


__all__ = ["BiPCL", "CLUDA", "CorDA", "CorDAModel", "METHODS", "Method", "SPCL", "SePiCo",
           "build_method"]
