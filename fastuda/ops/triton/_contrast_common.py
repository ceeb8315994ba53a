"""Helpers shared by the fused contrast kernels: launch configuration, dtypes, input checks.

Everything here runs on the host. The kernels themselves live next to their ops (contrast.py,
bank.py, pixel.py); they read channels-first ``[B, D, P]`` features through explicit strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT32_MIN = -(2**31)


@triton.jit
def labels_tile(y_ptr, syb, syp, b, offs_p, pmask, num_classes, ignore_index, err_ptr,
                 CHECK: tl.constexpr):
    """Labels of one pixel tile as int32 class ids (0 where not valid) and the valid mask.

    With CHECK, labels outside [0, C) that are not ignore_index are counted into err_ptr[0] and
    the largest of them goes to err_ptr[1]; those pixels are treated as not valid (no
    out-of-bounds reads), and the host raises after the kernel."""
    y = tl.load(y_ptr + b * syb + offs_p * syp, mask=pmask, other=0).to(tl.int64)
    valid = pmask & (y != ignore_index)
    bad = valid & ((y < 0) | (y >= num_classes))
    if CHECK:
        n_bad = tl.sum(bad.to(tl.int32), axis=0)
        if n_bad > 0:
            tl.atomic_add(err_ptr, n_bad)
            tl.atomic_max(err_ptr + 1, tl.max(tl.where(bad, y.to(tl.int32), -2147483647),
                                                axis=0))
    valid = valid & ~bad
    return tl.where(valid, y, 0).to(tl.int32), valid


def interpreting(kernel: object) -> bool:
    """True when ``kernel`` was built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_device(op: str, kernel: object, *tensors: Tensor | None) -> None:
    """All tensors on one device that this kernel build can run on."""
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"fastuda_triton.{op}: inputs are on different devices "
                         f"({', '.join(sorted(str(d) for d in devices))})")
    dev = present[0].device
    if interpreting(kernel):
        if dev.type != "cpu":
            raise RuntimeError(f"fastuda_triton.{op}: the Triton interpreter (TRITON_INTERPRET=1) "
                               f"runs on CPU tensors, got {dev}")
    elif dev.type != "cuda":
        raise RuntimeError(f"fastuda_triton.{op}: Triton kernels need CUDA tensors, got {dev} "
                           "(set TRITON_INTERPRET=1 before triton is imported to run them on "
                           "the CPU interpreter)")


def check_feats(op: str, feats: Tensor) -> tuple[int, int, int]:
    if feats.dim() != 3:
        raise ValueError(f"fastuda_triton.{op}: feats must be [B, D, P], got shape "
                         f"{tuple(feats.shape)}")
    if feats.dtype not in FEATURE_DTYPES:
        raise TypeError(f"fastuda_triton.{op}: feats must be float32/float16/bfloat16/float64, "
                        f"got {feats.dtype}")
    B, D, P = feats.shape
    return B, D, P


def check_pixel_map(op: str, name: str, t: Tensor | None, feats: Tensor,
                    integer: bool) -> None:
    """labels / weights / pair_weights: [B, P] matching feats [B, D, P]."""
    if t is None:
        return
    B, _, P = feats.shape
    if tuple(t.shape) != (B, P):
        raise ValueError(f"fastuda_triton.{op}: {name} shape {tuple(t.shape)} does not match "
                         f"feats shape {tuple(feats.shape)} (expected [{B}, {P}])")
    if integer and (t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"fastuda_triton.{op}: {name} must be an integer tensor, got {t.dtype}")
    if not integer and not t.dtype.is_floating_point:
        raise TypeError(f"fastuda_triton.{op}: {name} must be a floating tensor, got {t.dtype}")


def acc_torch_dtype(feats: Tensor) -> torch.dtype:
    """Accumulation and result dtype: fp64 for fp64 features (gradcheck), else fp32."""
    return torch.float64 if feats.dtype == torch.float64 else torch.float32


def acc_tl_dtype(feats: Tensor) -> tl.dtype:
    return tl.float64 if feats.dtype == torch.float64 else tl.float32


def dot_precision(kernel: object, feats: Tensor) -> str:
    """input_precision of the kernels' tl.dot calls on fp32 operands.

    The interpreter and fp64 use "ieee". fp16/bf16 features are exact in tf32 (10-bit mantissa),
    so "tf32" only rounds the other operand (class table, gradient coefficients) to 2^-11. fp32
    features follow torch's global fp32 matmul setting (torch.set_float32_matmul_precision):
    "highest" (torch's default) -> "tf32x3" (three tf32 tensor-core products, about fp32
    accuracy, far faster than fp32 FMA), otherwise "tf32"."""
    if interpreting(kernel) or feats.dtype == torch.float64:
        return "ieee"
    if feats.dtype != torch.float32:
        return "tf32"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def dummy(ref: Tensor) -> Tensor:
    """Placeholder pointer for an absent optional input (never read: the kernel's flag is off)."""
    return torch.empty(1, dtype=torch.float32, device=ref.device)


def strides2(t: Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def new_label_error(ref: Tensor) -> Tensor:
    """[count of out-of-range labels, largest such label]: filled by the kernel's own label pass."""
    return torch.tensor([0, _INT32_MIN], dtype=torch.int32, device=ref.device)


def raise_label_error(op: str, err: Tensor, num_classes: int, ignore_index: int) -> None:
    """One small device-to-host read after the forward kernel."""
    count, value = err.tolist()
    if count:
        raise ValueError(f"fastuda_triton.{op}: label value {value} is outside [0, {num_classes}) "
                         f"and is not ignore_index ({ignore_index}); {count} such pixel(s)")
