"""Backend choice for the fastuda ops and loading of the compiled extensions.

``backend=`` on every op: "auto" (the fastest verified implementation for the tensor's device),
"cpu" (C++), "cuda", "triton", "torch" (the reference). An explicit backend that cannot serve the
tensor raises; nothing silently falls back, except "triton" on an op without a Triton kernel (see
fastuda.ops._op.Op.resolve).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch
from torch import Tensor

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")

_ext_error: str | None = None
try:  # importing the extension registers the C++ ops under torch.ops.fastuda
    importlib.import_module("fastuda._C")
except ImportError as err:  # a source checkout that was never built
    _ext_error = str(err)


def extension_available() -> bool:
    return _ext_error is None


def cuda_kernels_built() -> bool:
    """True when fastuda._C was compiled with its CUDA sources."""
    if _ext_error is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastuda::class_stats", "CUDA")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require_extension(op: str) -> None:
    if _ext_error is not None:
        raise RuntimeError(f"fastuda.ops.{op}: the compiled kernels (fastuda._C) are not built "
                           f"({_ext_error}); run `pip install -e . --no-build-isolation` "
                           "or use backend='torch'")


def resolve(op: str, backend: str, device: torch.device,
            auto_order: dict[str, tuple[str, ...]] | None = None,
            supported: tuple[str, ...] = ("cpu", "cuda", "torch")) -> str:
    """The concrete backend that runs ``op`` on ``device``; raises a clear error if impossible.

    ``supported`` lists the backends implemented for this op; ``auto_order`` maps a device type to
    its preference list for "auto" (first available wins)."""
    if backend not in BACKENDS:
        raise ValueError(f"fastuda.ops.{op}: backend must be one of {BACKENDS}, got {backend!r}")
    dev = device.type
    if backend == "auto":
        order = (auto_order or {}).get(dev, {"cpu": ("cpu", "torch"),
                                              "cuda": ("cuda", "triton", "torch")}.get(dev,
                                                                                     ("torch",)))
        for cand in order:
            if cand in supported and _can_serve(cand, dev):
                return cand
        return "torch"
    if backend not in supported:
        raise ValueError(f"fastuda.ops.{op}: backend {backend!r} is not implemented for this op "
                         f"(available: {', '.join(supported)})")
    if not _can_serve(backend, dev):
        raise ValueError(f"fastuda.ops.{op}: backend {backend!r} cannot run on {dev} tensors"
                         + (f" ({_ext_error})" if backend in ("cpu", "cuda") and _ext_error
                            else ""))
    return backend


def _can_serve(backend: str, dev: str) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return dev == "cpu" and _ext_error is None
    if backend == "cuda":
        return dev == "cuda" and cuda_kernels_built()
    if backend == "triton":
        # on CPU tensors only in interpreter mode (tests); on CUDA tensors natively
        return triton_available() and (dev == "cuda" or (dev == "cpu" and triton_interpreted()))
    return False


def as_bdp(feats: Tensor) -> Tensor:
    """View features as [B, D, P] without copying: [B, D, H, W] -> [B, D, H*W]; [N, D] -> [1, D, N].

    Channels-last [B, D, H, W] tensors (not viewable) are reshaped, which copies once."""
    if feats.dim() == 4:
        B, D, H, W = feats.shape
        try:
            return feats.view(B, D, H * W)
        except RuntimeError:
            return feats.reshape(B, D, H * W)
    if feats.dim() == 2:
        return feats.t().unsqueeze(0)
    raise ValueError(f"feats must be [N, D] or [B, D, H, W], got shape {tuple(feats.shape)}")


def as_bp(labels: Tensor, feats: Tensor, name: str = "labels") -> Tensor:
    """Labels (or per-pixel weights) as [B, P] matching ``as_bdp(feats)``; checks the shapes."""
    if feats.dim() == 4:
        B, _, H, W = feats.shape
        if labels.shape not in ((B, H, W), (B, 1, H, W)):
            raise ValueError(f"{name} shape {tuple(labels.shape)} does not match feats shape "
                             f"{tuple(feats.shape)} (expected [{B}, {H}, {W}])")
        return labels.reshape(B, H * W)
    N = feats.shape[0]
    if labels.numel() != N or labels.dim() > 2:
        raise ValueError(f"{name} shape {tuple(labels.shape)} does not match feats shape "
                         f"{tuple(feats.shape)} (expected [{N}])")
    return labels.reshape(1, N)


def check_feats(op: str, feats: Tensor) -> None:
    if feats.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"fastuda.ops.{op}: feats must be float32/float16/bfloat16 (or float64), "
                        f"got {feats.dtype}")


def check_devices(op: str, feats: Tensor, **others: Tensor | None) -> None:
    """Every tensor argument on the device of feats (a meta or other-device tensor would be read
    as garbage by a CPU kernel or crash a CUDA one); a ValueError naming both otherwise."""
    for name, t in others.items():
        if t is not None and t.device != feats.device:
            raise ValueError(f"fastuda.ops.{op}: {name} is on {t.device}, feats on "
                             f"{feats.device}; move them to one device")


def check_labels(op: str, labels: Tensor) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"fastuda.ops.{op}: labels must be an integer tensor, got {labels.dtype}")


Impl = Callable[..., object]
