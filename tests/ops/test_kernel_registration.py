"""Every op of csrc/ops_schema.h is registered by its CUDA family file (csrc/cuda/<f>.cu), which
is compiled twice: by g++ for the host emulation (CPU key of torch.ops.fastuda_emu) and, in a CUDA
build, by nvcc (CUDA key of torch.ops.fastuda). The op names are read from the schema list itself,
so a family file without an op's m.impl, or a family file setup.py does not compile, fails here."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from fastuda.ops import extension_available

SCHEMA_LIST = Path(__file__).resolve().parents[2] / "csrc" / "ops_schema.h"


def _schema_ops() -> list[str]:
    return re.findall(r'X\("(\w+)\(', SCHEMA_LIST.read_text())


def _emu_available() -> bool:
    try:
        importlib.import_module("fastuda._C_emu")
    except ImportError:
        return False
    return True


def test_schema_list_names_every_family() -> None:
    # one op of each family, as csrc/README.md lists them
    assert {"downscale_labels", "class_stats", "proto_contrast_forward", "dist_contrast_backward",
            "bank_contrast_forward", "pixel_contrast_backward"} <= set(_schema_ops())


@pytest.mark.skipif(not _emu_available(), reason="fastuda._C_emu is not built")
@pytest.mark.parametrize("op", _schema_ops())
def test_emulated_kernel_registered(op: str) -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastuda_emu::{op}", "CPU")


@pytest.mark.skipif(not extension_available(), reason="fastuda._C is not built")
@pytest.mark.parametrize("op", _schema_ops())
def test_cuda_kernel_registered_in_a_cuda_build(op: str) -> None:
    # A CUDA build links the CUDA runtime into fastuda._C (its ELF names the library); a CPU-only
    # build does not, and then no op may claim a CUDA kernel either.
    so_path = importlib.util.find_spec("fastuda._C").origin
    cuda_build = b"libcudart.so" in Path(so_path).read_bytes()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastuda::{op}", "CUDA") == cuda_build
