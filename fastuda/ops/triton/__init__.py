"""Triton kernels of fastuda (fused contrast losses).

Importing this package imports triton. On a CUDA device the kernels compile natively; on CPU
tensors they run only under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
before triton is first imported in the process.
"""

from .contrast import (
    bank_contrast_per_pixel,
    dist_contrast_per_pixel,
    pixel_contrast_per_pixel,
    proto_contrast_per_pixel,
)

__all__ = ["bank_contrast_per_pixel", "dist_contrast_per_pixel", "pixel_contrast_per_pixel",
           "proto_contrast_per_pixel"]
