"""Domain-adaptation methods: plug-ins of the self-training loop (fastuda/engine/self_training.py),
one module per method, registered here (docs/architecture.md, "Adding a method")."""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..engine.context import MethodContext
from .base import Method, MethodStack
from .bipcl import BiPCL
from .cluda import CLUDA
from .corda import CorDA, CorDAModel
from .daynight import DayNight
from .fdist import FDist
from .mic import MIC
from .sepico import SePiCo
from .spcl import SPCL

# name -> class; a config's ``methods = [...]`` names these, ``[name]`` is the class's Settings
METHODS: dict[str, type[Method]] = {m.name: m for m in (SePiCo, CLUDA, SPCL, BiPCL, CorDA, MIC,
                                                        FDist, DayNight)}


def build_methods(cfg: Config, network: nn.Module, device: torch.device) -> MethodStack:
    """The methods of ``cfg.methods`` (in that order) around one context for ``network`` (the
    model before any method wraps it); an empty stack is plain self-training / source-only."""
    ctx = MethodContext.from_config(cfg, network, device)
    methods = [METHODS[name](cfg.settings(name), ctx) for name in cfg.methods]
    return MethodStack(methods, ctx).to(device)


__all__ = ["BiPCL", "CLUDA", "CorDA", "CorDAModel", "DayNight", "FDist", "METHODS", "MIC", "Method",
           "MethodStack", "SPCL", "SePiCo", "build_methods"]
