"""fastuda.ops: the public numerical API (see shared spec ops.md).

Every op takes ``backend=`` ("auto" | "cpu" | "cuda" | "triton" | "torch"); "torch" runs the plain
PyTorch reference in :mod:`fastuda.ops.reference`.
"""

from . import reference
from ._backend import BACKENDS, cuda_kernels_built, extension_available
from .bank_contrast import bank_contrast
from .class_stats import ClassStatistics, all_reduce_stats, class_stats
from .contrast import dist_contrast, proto_contrast
from .labels import downscale_labels
from .pixel_contrast import pixel_contrast
from .stats import ClassStats, merge_stats

__all__ = [
    "BACKENDS", "ClassStatistics", "ClassStats", "all_reduce_stats", "bank_contrast",
    "class_stats", "cuda_kernels_built", "dist_contrast", "downscale_labels",
    "extension_available", "merge_stats", "pixel_contrast", "proto_contrast", "reference",
]
