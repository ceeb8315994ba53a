"""Issue 18 point 8: an op given centroids / covariance / a bank / weights on another device than
the features read garbage (a meta tensor on CPU) instead of refusing them."""

from __future__ import annotations

import pytest
import torch

from fastuda.ops import bank_contrast, class_stats, dist_contrast, pixel_contrast, proto_contrast

B, D, H, W, C = 1, 4, 2, 3, 3


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("op,arg", [("proto", "centroids"), ("dist", "centroids"),
                                    ("dist", "covariance"), ("bank", "bank"),
                                    ("class_stats", "weights"), ("pixel", "weights"),
                                    ("pixel", "pair_weights")])
def test_a_tensor_on_another_device_is_refused_naming_both(op: str, arg: str,
                                                           backend: str) -> None:
    feats = torch.randn(B, D, H, W)
    labels = torch.randint(0, C, (B, H, W))
    args = {"centroids": torch.randn(C, D), "covariance": torch.rand(C, D),
            "bank": torch.randn(C, 2, D), "weights": torch.rand(B, H, W),
            "pair_weights": torch.rand(B, H, W)}
    args[arg] = args[arg].to("meta")
    with pytest.raises(ValueError, match=f"{arg} is on meta, feats on cpu"):
        if op == "proto":
            proto_contrast(feats, labels, args["centroids"], tau=0.5, backend=backend)
        elif op == "dist":
            dist_contrast(feats, labels, args["centroids"], args["covariance"], tau=0.5,
                          backend=backend)
        elif op == "bank":
            bank_contrast(feats, labels, args["bank"], torch.tensor([2, 2, 2]), tau=0.5,
                          backend=backend)
        elif op == "class_stats":
            class_stats(feats, labels, C, weights=args["weights"], backend=backend)
        else:
            pixel_contrast(feats, labels, tau=0.5, backend=backend,
                           **{arg: args[arg]})
