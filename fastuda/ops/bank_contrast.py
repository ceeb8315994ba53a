"""Memory-bank contrast (BankCL): positives are the bank entries of the pixel's class, negatives the
mean entry of every other class (ops.md section 5)."""

from __future__ import annotations

from torch import Tensor

from . import _backend, reference
from .class_stats import _check_label_range

_BACKENDS: tuple[str, ...] = ("torch",)


def bank_contrast(feats: Tensor, labels: Tensor, bank: Tensor, bank_len: Tensor, *, tau: float,
                  ignore_index: int = 255, reduction: str = "mean",
                  backend: str = "auto") -> Tensor:
    _backend.check_feats("bank_contrast", feats)
    _backend.check_labels("bank_contrast", labels)
    labels_bp = _backend.as_bp(labels, feats)
    if bank.dim() != 3 or bank.shape[2] != feats.shape[1] or bank_len.shape != bank.shape[:1]:
        raise ValueError(f"fastuda.ops.bank_contrast: bank {tuple(bank.shape)} / bank_len "
                         f"{tuple(bank_len.shape)} do not match feats {tuple(feats.shape)} "
                         "(expected bank [C, M, D] and bank_len [C])")
    which = _backend.resolve("bank_contrast", backend, feats.device, supported=_BACKENDS)
    _check_label_range(labels_bp, bank.shape[0], ignore_index)
    assert which == "torch"
    return reference.bank_contrast(feats, labels, bank, bank_len, tau=tau,
                                   ignore_index=ignore_index, reduction=reduction)
