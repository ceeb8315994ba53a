"""Process set-up shared by the entry points (train, evaluate, profile): the device a config
names and the seeding of every global random stream."""

from __future__ import annotations

import random

import numpy as np
import torch

from ..config import ConfigError


def pick_device(name: str) -> torch.device:
    """``train.device``: "auto" takes CUDA when a device is visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is visible")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


__all__ = ["pick_device", "seed_everything"]
