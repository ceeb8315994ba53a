"""Builds fastuda's kernels: ``fastuda._C`` (C++ CPU ops, plus CUDA ops when nvcc and a CUDA torch
are present) and ``fastuda._C_emu`` (the CUDA kernel sources compiled for the host, so the CPU test
suite executes them; see csrc/README.md).

Environment:
  FASTUDA_CUDA=0   skip the CUDA sources;  FASTUDA_CUDA=1   require them (a compile error fails)
  TORCH_CUDA_ARCH_LIST   defaults to "8.0;9.0" when unset and no GPU is visible
  FASTUDA_NATIVE=0 build without -march=native (portable binaries)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.resolve()


def _find_cuda_home() -> str | None:
    """The toolkit root. torch guesses it from where `nvcc` is found; here that is a wrapper in a
    general bin folder, so the guess is wrong: look in the places the toolkit really lives."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and Path(os.environ[var], "bin", "nvcc").exists():
            return os.environ[var]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:  # nvcc --dryrun prints the toolkit's TOP
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True,
                             text=True, timeout=60)
        match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if match:
            return str(Path(match.group(1)).resolve())
    except (OSError, subprocess.SubprocessError):
        pass
    return None


_want_cuda = os.environ.get("FASTUDA_CUDA", "auto").lower()
if _want_cuda not in ("0", "1", "auto"):
    sys.exit(f"FASTUDA_CUDA must be 0, 1 or unset, got {_want_cuda!r}")
_cuda_home = _find_cuda_home() if _want_cuda != "0" else None
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # must precede the cpp_extension import

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _cuda_build_possible() -> tuple[bool, str]:
    if _want_cuda == "0":
        return False, "FASTUDA_CUDA=0"
    if torch.version.cuda is None:
        return False, "this torch is a CPU build"
    if _cuda_home is None:
        return False, "nvcc / the CUDA toolkit was not found"
    return True, ""


def _nvidia_wheel_includes() -> list[str]:
    """torch's CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit may lack; the
    nvidia wheels installed with torch carry them."""
    return sorted({str(Path(site, "nvidia", "cu13", "include")) for site in sys.path
                   if Path(site, "nvidia", "cu13", "include").is_dir()})


def _srcs(pattern: str) -> list[str]:
    return sorted(str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / pattern)))


cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function"]
if os.environ.get("FASTUDA_NATIVE", "1") != "0":
    cxx_flags.append("-march=native")
link_flags = ["-fopenmp"]
include_dirs = [str(ROOT / "csrc")]

use_cuda, why_not = _cuda_build_possible()
if _want_cuda == "1" and not use_cuda:
    sys.exit(f"FASTUDA_CUDA=1 but the CUDA build is impossible: {why_not}")

sources = ["csrc/ops.cpp", *_srcs("csrc/cpu/*.cpp")]
if use_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources += _srcs("csrc/cuda/*.cpp") + _srcs("csrc/cuda/*.cu")
    main_ext = CUDAExtension(
        "fastuda._C", sources, include_dirs=include_dirs + _nvidia_wheel_includes(),
        define_macros=[("FASTUDA_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-O3", "--use_fast_math", "-std=c++20", "-lineinfo"]},
        extra_link_args=link_flags)
else:
    print(f"fastuda: building CPU kernels only ({why_not})", flush=True)
    main_ext = CppExtension("fastuda._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

ext_modules = [main_ext]
emu_sources = _srcs("csrc/emu/*.cpp")
if emu_sources:
    # The CUDA kernel bodies compiled with g++ against the host SIMT layer
    # (csrc/common/simt_host.h).
    ext_modules.append(CppExtension(
        "fastuda._C_emu", emu_sources, include_dirs=include_dirs,
        define_macros=[("FASTUDA_SIMT_HOST", "1")],
        extra_compile_args={"cxx": [f for f in cxx_flags if f != "-march=native"]},
        extra_link_args=link_flags))

setup(ext_modules=ext_modules,
      cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
