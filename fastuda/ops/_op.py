"""The op descriptor: what fastuda knows about one op family, written once.

An :class:`Op` names the compiled ops of the family (their schemas are the lines of
``csrc/ops_schema.h``), the plain-PyTorch reference, the fake (meta) implementations, the autograd
formula, the Triton module if there is one, and which backends check the label range inside their
kernel. The public wrapper (``fastuda/ops/<family>.py``) checks its inputs once, then asks the
descriptor for the backend and calls the op it returns.

Every namespace that implements the schemas gets the same fake and autograd registrations from
:meth:`Op.register`: ``fastuda`` (the C++/CUDA kernels of ``fastuda._C``), ``fastuda_triton``
(the Triton kernels, defined through :meth:`Op.define_triton` under the same op names and
schemas) and, in the tests, ``fastuda_emu`` (the CUDA kernels compiled for the host).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _backend

# torch.library fragments of the Triton namespace; kept alive for the process.
_TRITON_LIBS: list[torch.library.Library] = []
_REGISTRY: dict[str, Op] = {}
_SUPPORTED_CACHE: dict[tuple[str, bool], tuple[str, ...]] = {}
# order of backends in a "supported" tuple
_ORDER = ("cpu", "cuda", "torch", "triton")


@dataclass(frozen=True)
class Autograd:
    """Autograd of a compiled forward op: ``make_backward(backward_op)`` returns the backward
    function for a namespace's backward op, so one formula serves every namespace."""
    forward: str
    backward_op: str
    make_backward: Callable[[Callable[..., object]], Callable[..., object]]
    setup_context: Callable[..., None]


@dataclass(frozen=True)
class Op:
    name: str                                   # public name: fastuda.ops.<name>
    compiled: tuple[str, ...]                   # op names in csrc/ops_schema.h
    reference: Callable[..., object]
    fakes: Mapping[str, Callable[..., object]]  # compiled name -> fake implementation
    autograd: Autograd | None = None
    triton: str | None = None                   # module defining the Triton implementations
    kernel_label_check: frozenset[str] = field(default_factory=lambda: frozenset({"cpu", "cuda"}))

    def __post_init__(self) -> None:
        _REGISTRY[self.name] = self

    # -- backends -----------------------------------------------------------------------------
    def supported(self, with_triton: bool) -> tuple[str, ...]:
        """The backends of this op: cpu / cuda when fastuda._C registered a kernel for them, the
        reference, and "triton" when asked for and the Triton module imports (importing it
        imports triton, which must not happen before a test has switched on its interpreter)."""
        return supported_backends(self.name, with_triton)

    def resolve(self, backend: str, device: torch.device) -> str:
        """The concrete backend for ``backend`` on ``device``. "triton" on an op without a Triton
        kernel means the next backend that can serve the tensor ("auto" without Triton), so that
        ``ops.backend = "triton"`` trains; every other impossible explicit choice raises."""
        if backend == "triton" and self.triton is None:
            return _backend.resolve(self.name, "auto", device,
                                    supported=self.supported(False))
        want_triton = backend == "triton" or (backend == "auto" and device.type == "cuda")
        return _backend.resolve(self.name, backend, device, supported=self.supported(want_triton))

    def dispatch(self, backend: str, device: torch.device, labels: Tensor | None = None,
                 num_classes: int | None = None, ignore_index: int = 255) -> str:
        """``resolve`` plus the label range check for backends whose kernel does not make it."""
        which = self.resolve(backend, device)
        if labels is not None and num_classes is not None and which not in self.kernel_label_check:
            check_label_range(labels, num_classes, ignore_index)
        return which

    def kernel(self, which: str, op: str | None = None) -> Callable[..., object]:
        """The op ``op`` (default: the first compiled op) of backend ``which``."""
        op = op or self.compiled[0]
        if which == "triton":
            importlib.import_module(self.triton or "")
            return getattr(torch.ops.fastuda_triton, op)
        return getattr(torch.ops.fastuda, op)

    # -- registration -------------------------------------------------------------------------
    def register(self, namespace: str) -> None:
        """Fake and autograd implementations of this op's schemas in ``namespace``."""
        for op, fake in self.fakes.items():
            torch.library.register_fake(f"{namespace}::{op}")(fake)
        if self.autograd is not None:
            a = self.autograd
            ns = getattr(torch.ops, namespace)
            backward_op = getattr(ns, a.backward_op)
            torch.library.register_autograd(
                f"{namespace}::{a.forward}",
                a.make_backward(lambda *args: backward_op(*args)),
                setup_context=a.setup_context)

    def define_triton(self, impls: Mapping[str, Callable[..., object]]) -> None:
        """Define ``fastuda_triton::<op>`` for every compiled op with the schema of
        ``torch.ops.fastuda.<op>`` (one schema list), implemented by ``impls[op]`` for CPU
        (interpreter) and CUDA tensors, and register the shared fake and autograd on them."""
        if not _backend.extension_available():
            raise ImportError("the Triton ops take their schemas from fastuda._C, which is not "
                              "built")
        if set(impls) != set(self.compiled):
            raise ValueError(f"{self.name}: Triton implementations {sorted(impls)} do not cover "
                             f"the op's schemas {list(self.compiled)}")
        lib = torch.library.Library("fastuda_triton", "FRAGMENT")
        _TRITON_LIBS.append(lib)
        for op, fn in impls.items():
            schema = str(getattr(torch.ops.fastuda, op).default._schema)
            lib.define(schema.removeprefix("fastuda::"))
            for key in ("CPU", "CUDA"):
                lib.impl(op, fn, key)
        self.register("fastuda_triton")


@torch.compiler.assume_constant_result
def supported_backends(name: str, with_triton: bool) -> tuple[str, ...]:
    """Computed once per (op, with_triton); a constant under torch.compile."""
    key = (name, with_triton)
    if key in _SUPPORTED_CACHE:
        return _SUPPORTED_CACHE[key]
    op = _REGISTRY[name]
    out = {"torch"}
    if _backend.extension_available():
        for backend, dispatch_key in (("cpu", "CPU"), ("cuda", "CUDA")):
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastuda::{op.compiled[0]}",
                                                              dispatch_key):
                out.add(backend)
    if with_triton and op.triton is not None:
        try:
            importlib.import_module(op.triton)
            out.add("triton")
        except Exception:  # any failure to import (no triton, no GPU driver) means no Triton
            pass
    _SUPPORTED_CACHE[key] = tuple(b for b in _ORDER if b in out)
    return _SUPPORTED_CACHE[key]


def check_label_range(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """Labels in [0, num_classes) or ignore_index; the kernels of ``Op.kernel_label_check``
    make this check themselves, the dispatch makes it for the others (one host sync)."""
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"label value {value} is outside [0, {num_classes}) and is not "
                         f"ignore_index ({ignore_index})")


def register_compiled(*ops: Op) -> None:
    """Register the fakes and autograd of ``ops`` on torch.ops.fastuda (when it is built)."""
    if _backend.extension_available():
        for op in ops:
            op.register("fastuda")


def out_dtype(feats: Tensor) -> torch.dtype:
    """Accumulation and loss dtype of every op: fp64 for fp64 feats, else fp32."""
    return torch.float64 if feats.dtype == torch.float64 else torch.float32
