"""Compile the contrast kernels for an NVIDIA target without a GPU: ``python -m
fastuda.ops.triton.compile_check [--arch 90] [--quick]``.

The CPU interpreter checks the kernels' arithmetic but not what only the compiler sees (dot
shape and dtype rules, loop-carried types, constexpr branches, register pressure). This runs
Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for the
launch configurations the wrappers would pick on a GPU, and prints ptxas' register and spill
counts. Must run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import bank as bank_mod
from . import contrast as contrast_mod
from . import pixel as pixel_mod

_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# pointer arguments whose element type follows the features; the rest are fp32 unless listed
_FEAT_PTRS = ("f_ptr", "df_ptr")
_INT_PTRS = {"y_ptr": "*i64", "err_ptr": "*i32", "len_ptr": "*i64"}


def _signature(kernel, consts: dict, feat_dtype: torch.dtype, acc: str) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _FEAT_PTRS:
            sig[name] = "*" + _TL[feat_dtype]
        elif name in _INT_PTRS:
            sig[name] = _INT_PTRS[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + acc
        elif name in ("inv_tau", "quad_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_usage(ptx: str, arch: int) -> tuple[str, str]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "?", "?"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(ptx)
    try:
        out = subprocess.run([ptxas, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}",
                              "-v", fh.name, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(fh.name)
    regs = re.findall(r"Used (\d+) registers", out.stderr)
    spill = re.findall(r"(\d+) bytes spill stores", out.stderr)
    return (regs[0] if regs else "?"), (spill[0] if spill else "?")


def _compile(kernel, cfg: dict, feat_dtype: torch.dtype, arch: int) -> str:
    cfg = dict(cfg)
    num_warps = cfg.pop("num_warps")
    acc = "fp64" if cfg.get("ACC") == tl.float64 else "fp32"
    src = ASTSource(kernel, _signature(kernel, cfg, feat_dtype, acc), constexprs=cfg)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    regs, spill = _ptxas_usage(compiled.asm["ptx"], arch)
    shown = {k: v for k, v in cfg.items() if k.startswith("BLOCK") or k == "COV"}
    return (f"{kernel.fn.__name__:28s} {_TL[feat_dtype]:5s} {shown} warps={num_warps} "
            f"regs={regs} spill_bytes={spill}")


def _cases(quick: bool):
    """(kernel, launch constexprs) pairs as the wrappers build them on a GPU."""
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
    for dt in dtypes:
        prec = "tf32x3" if dt == torch.float32 else "tf32"
        acc = tl.float32
        feats = torch.empty(1, 256, 1, dtype=dt)
        kinds = (contrast_mod.COV_DIAG, contrast_mod.COV_FULL) if quick else (
            contrast_mod.COV_NONE, contrast_mod.COV_DIAG, contrast_mod.COV_FULL)
        for cov in kinds:
            cfg = contrast_mod._config(feats, 19, cov)
            base = dict(cfg, COV=cov, HAS_W=True, ACC=acc, PREC=prec)
            yield contrast_mod._centroid_fwd_kernel, base, dt
            yield contrast_mod._centroid_bwd_kernel, dict(base, STATS_GRAD=True), dt
        cfg = contrast_mod._config(feats, 19, contrast_mod.COV_DIAG)
        yield contrast_mod._class_feature_sum_kernel, dict(cfg, SQUARE=True, ACC=acc,
                                                            PREC=prec), dt
        yield contrast_mod._class_gram_kernel, {
            "BLOCK_P": cfg["BLOCK_P"], "BLOCK_D": cfg["BLOCK_D"], "ACC": acc, "PREC": prec,
            "num_warps": cfg["num_warps"]}, dt
        for M in ((64,) if quick else (64, 256)):
            cfg = dict(bank_mod._config(19, M), ACC=acc, PREC=prec)
            yield bank_mod._bank_fwd_kernel, cfg, dt
            yield bank_mod._bank_bwd_kernel, cfg, dt
        for D in ((256,) if quick else (128, 256, 512)):
            cfg = dict(pixel_mod._config(torch.empty(1, D, 1, dtype=dt)), ACC=acc, PREC=prec)
            both = dict(cfg, HAS_W=True, HAS_A=True)
            yield pixel_mod._pixel_fwd_kernel, both, dt
            yield pixel_mod._pixel_bwd_coef_kernel, both, dt
            yield pixel_mod._pixel_bwd_kernel, dict(cfg, HAS_A=True), dt
    # fp64 features (gradcheck on a GPU) take the fp64 dot path
    feats64 = torch.empty(1, 64, 1, dtype=torch.float64)
    cfg = contrast_mod._config(feats64, 19, contrast_mod.COV_DIAG)
    yield contrast_mod._centroid_fwd_kernel, dict(cfg, COV=1, HAS_W=True, ACC=tl.float64,
                                                  PREC="ieee"), torch.float64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--quick", action="store_true", help="one configuration per kernel")
    parser.add_argument("--only", default="", help="regular expression on kernel names")
    parser.add_argument("--dtype", choices=["all", "bf16", "fp32"], default="all")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)")
        return 2
    for kernel, cfg, dt in _cases(args.quick):
        if not re.search(args.only, kernel.fn.__name__) or args.dtype not in ("all", _TL[dt]):
            continue
        print(_compile(kernel, cfg, dt, args.arch), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
