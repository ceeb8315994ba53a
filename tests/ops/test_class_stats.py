"""fastuda.ops.class_stats: every compiled backend against the PyTorch reference (run in fp64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastuda.ops import class_stats, extension_available, reference
from fastuda.ops._backend import cuda_kernels_built

needs_ext = pytest.mark.skipif(not extension_available(), reason="fastuda._C is not built")
BACKENDS = [
    pytest.param("cpu", marks=needs_ext),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not (torch.cuda.is_available() and cuda_kernels_built()),
        reason="needs a GPU and the CUDA kernels")]),
]


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


def _expected(feats, labels, C, weights=None, cov="diag", ignore_index=255):
    """The reference evaluated in fp64 on the same values (upcast), on the CPU."""
    return reference.class_stats(feats.detach().cpu().double(), labels.cpu(), C,
                                 ignore_index=ignore_index,
                                 weights=None if weights is None else weights.cpu().double(),
                                 cov=cov)


def _assert_close(got, want, rtol=1e-5, atol=1e-5):
    for name, g, w in zip(("count", "mean", "m2"), got, want, strict=True):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.cpu().double(), w, rtol=rtol, atol=atol, msg=name)


def _labels(shape, C, ignore_frac=0.2, gen=None):
    y = torch.randint(0, C, shape, generator=gen)
    y[torch.rand(shape, generator=gen) < ignore_frac] = 255
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(1000, 7), (2, 16, 9, 13), (3, 5, 1, 17), (1, 33, 70, 70)])
def test_matches_reference(backend, cov, weighted, shape):
    gen = torch.Generator().manual_seed(hash((cov, weighted, shape)) % 2**31)
    C = 6
    feats = torch.randn(shape, generator=gen) * 2 + 0.5
    lab_shape = (shape[0],) if len(shape) == 2 else (shape[0], *shape[2:])
    labels = _labels(lab_shape, C, gen=gen)
    weights = torch.rand(lab_shape, generator=gen) if weighted else None
    dev = _device(backend)
    got = class_stats(feats.to(dev), labels.to(dev), C, cov=cov, backend=backend,
                      weights=None if weights is None else weights.to(dev))
    assert all(t.dtype == torch.float32 for t in got)
    _assert_close(got, _expected(feats, labels, C, weights, cov), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_many_chunks_and_channels(backend, cov):
    """Inputs spanning several kernel chunks and thread slots, pixel-major and channels-first."""
    gen = torch.Generator().manual_seed(3)
    dev = _device(backend)
    for feats in (torch.randn(40000, 5, generator=gen), torch.randn(700, 300, generator=gen),
                  torch.randn(2, 300, 9, 70, generator=gen)):
        lab_shape = (feats.shape[0],) if feats.dim() == 2 else (feats.shape[0], *feats.shape[2:])
        labels = _labels(lab_shape, 19, gen=gen)
        got = class_stats(feats.to(dev), labels.to(dev), 19, cov=cov, backend=backend)
        _assert_close(got, _expected(feats, labels, 19, cov=cov), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_non_contiguous_inputs(backend, cov):
    gen = torch.Generator().manual_seed(1)
    dev = _device(backend)
    C = 4
    base = torch.randn(2, 24, 11, 10, generator=gen)
    labels = _labels((2, 11, 10), C, gen=gen)
    cases = [
        base.to(memory_format=torch.channels_last),        # pixel stride 1 is gone
        base[:, ::2],                                      # every other channel
        base[:, :, :, 1:9],                                # sliced width (not viewable as [B,D,P])
        base.transpose(2, 3),                              # transposed spatial dims
    ]
    for feats in cases:
        lab = labels[:, :, 1:9] if feats.shape[-1] == 8 else labels
        lab = lab.transpose(1, 2) if feats.shape[-2:] == (10, 11) else lab
        got = class_stats(feats.to(dev), lab.to(dev), C, cov=cov, backend=backend)
        _assert_close(got, _expected(feats, lab, C, cov=cov))
    # [N, D] views: the transpose of a [D, N] matrix and a strided row selection, with strided
    # labels and weights
    mat = torch.randn(9, 301, generator=gen)
    lab = _labels((602,), C, gen=gen)[::2]
    w = torch.rand(301 * 3, generator=gen)[::3]
    for feats in (mat.t(), torch.randn(602, 9, generator=gen)[::2]):
        got = class_stats(feats.to(dev), lab.to(dev), C, cov=cov, weights=w.to(dev),
                          backend=backend)
        _assert_close(got, _expected(feats, lab, C, w, cov=cov))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_all_ignore_single_class_and_empty_classes(backend, cov):
    gen = torch.Generator().manual_seed(2)
    dev = _device(backend)
    feats = torch.randn(2, 6, 5, 7, generator=gen)
    ignore = torch.full((2, 5, 7), 255)
    got = class_stats(feats.to(dev), ignore.to(dev), 5, cov=cov, backend=backend)
    m2_shape = (5, 6) if cov == "diag" else (5, 6, 6)
    assert torch.equal(got.count.cpu(), torch.zeros(5))
    assert torch.equal(got.mean.cpu(), torch.zeros(5, 6))
    assert torch.equal(got.m2.cpu(), torch.zeros(m2_shape))
    # one class only, among 9 (the others stay exactly zero)
    single = torch.full((2, 5, 7), 3)
    single[0, 0] = 255
    got = class_stats(feats.to(dev), single.to(dev), 9, cov=cov, backend=backend)
    _assert_close(got, _expected(feats, single, 9, cov=cov))
    others = [c for c in range(9) if c != 3]
    assert torch.equal(got.count.cpu()[others], torch.zeros(8))
    assert got.count[3].item() == 2 * 5 * 7 - 7
    assert not got.m2.cpu()[others].any()
    # a class whose pixels all have weight 0 counts as empty
    weights = torch.ones(2, 5, 7)
    labels = torch.randint(0, 3, (2, 5, 7), generator=gen)
    weights[labels == 1] = 0.0
    got = class_stats(feats.to(dev), labels.to(dev), 3, cov=cov, weights=weights.to(dev),
                      backend=backend)
    assert got.count[1].item() == 0 and not got.mean[1].any() and not got.m2[1].any()
    _assert_close(got, _expected(feats, labels, 3, weights, cov=cov))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_offset_features(backend, cov, offset):
    """offset + N(0, 1): sum(x^2) - n mean^2 in fp32 loses the variance; two-pass/Chan does not."""
    gen = torch.Generator().manual_seed(4)
    dev = _device(backend)
    feats = offset + torch.randn(3, 4, 40, 40, generator=gen)
    labels = torch.randint(0, 3, (3, 40, 40), generator=gen)
    got = class_stats(feats.to(dev), labels.to(dev), 3, cov=cov, backend=backend)
    want = _expected(feats, labels, 3, cov=cov)
    var_got = got.m2.cpu().double() / got.count.cpu().double().view(-1, *[1] * (got.m2.dim() - 1))
    var_want = want.m2 / want.count.view(-1, *[1] * (want.m2.dim() - 1))
    torch.testing.assert_close(var_got, var_want, rtol=2e-3, atol=2e-3)
    if offset < 1e4:
        return
    # the test is sensitive: the naive fp32 formula is far off on these values
    f = feats.permute(0, 2, 3, 1).reshape(-1, 4)
    y = labels.reshape(-1)
    naive = torch.stack([(f[y == c] ** 2).sum(0) - (y == c).sum() * f[y == c].mean(0) ** 2
                         for c in range(3)])
    assert (naive.double() / want.count[:, None] - (want.m2 if cov == "diag" else
            torch.diagonal(want.m2, dim1=1, dim2=2)) / want.count[:, None]).abs().max() > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_feature_dtypes(backend, dtype, cov):
    gen = torch.Generator().manual_seed(5)
    dev = _device(backend)
    feats = torch.randn(2, 12, 8, 9, generator=gen).to(dtype)
    labels = _labels((2, 8, 9), 5, gen=gen)
    w = torch.rand(2, 8, 9, generator=gen)
    got = class_stats(feats.to(dev), labels.to(dev), 5, cov=cov, weights=w.to(dev),
                      backend=backend)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(t.dtype == want_dtype for t in got)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    _assert_close(got, _expected(feats, labels, 5, w, cov=cov), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32,
                                         torch.int64])
def test_label_dtypes(backend, label_dtype):
    gen = torch.Generator().manual_seed(6)
    dev = _device(backend)
    feats = torch.randn(2, 5, 6, 7, generator=gen)
    labels = torch.randint(0, 4, (2, 6, 7), generator=gen)
    ignore = -1 if label_dtype == torch.int8 else 255
    labels[0, 0] = ignore
    got = class_stats(feats.to(dev), labels.to(label_dtype).to(dev), 4, ignore_index=ignore,
                      backend=backend)
    _assert_close(got, _expected(feats, labels, 4, ignore_index=ignore))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    gen = torch.Generator().manual_seed(7)
    dev = _device(backend)
    feats = torch.randn(2, 32, 50, 50, generator=gen).to(dev)
    labels = _labels((2, 50, 50), 19, gen=gen).to(dev)
    for cov in ("diag", "full"):
        a = class_stats(feats, labels, 19, cov=cov, backend=backend)
        b = class_stats(feats, labels, 19, cov=cov, backend=backend)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    full = class_stats(feats, labels, 19, cov="full", backend=backend).m2
    assert torch.equal(full, full.transpose(1, 2))


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
def test_bad_labels_and_shapes(backend):
    dev, name = _device(backend), backend
    feats = torch.randn(2, 4, 3, 5, device=dev)
    labels = torch.randint(0, 3, (2, 3, 5), device=dev)
    labels[1, 2, 4] = 7
    # on a GPU a bad label is a device-side assert that poisons the CUDA context (csrc/README.md):
    # test_cuda_device.py checks it in a child process; here only the emulated kernel raises
    if dev.type != "cuda":
        with pytest.raises(ValueError, match=r"label value 7 .*outside \[0, 3\)"):
            class_stats(feats, labels, 3, backend=name)
    labels[1, 2, 4] = -2
    if dev.type != "cuda":
        with pytest.raises(ValueError, match=r"label value -2 .*ignore_index \(255\)"):
            class_stats(feats, labels, 3, backend=name)
    with pytest.raises(ValueError, match=r"labels shape \(2, 3, 4\) does not match feats shape"):
        class_stats(feats, labels[:, :, :4], 3, backend=name)
    with pytest.raises(ValueError, match=r"weights shape \(2, 15\) does not match"):
        class_stats(feats, labels.clamp(0, 2), 3, weights=torch.ones(2, 15, device=dev),
                    backend=name)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        class_stats(feats, labels.float(), 3, backend=name)
    with pytest.raises(ValueError, match="cov must be 'diag' or 'full'"):
        class_stats(feats, labels.clamp(0, 2), 3, cov="dense", backend=name)


@needs_ext
def test_cpu_kernel_errors():
    feats = torch.randn(1, 4, 10)
    labels = torch.zeros(1, 10, dtype=torch.long)
    w = torch.ones(1, 10)
    w[0, 3] = -1.0
    with pytest.raises(ValueError, match=r"weight -1 .*must be >= 0"):
        torch.ops.fastuda.class_stats(feats, labels, 2, 255, w, False)
    with pytest.raises(ValueError, match=r"labels shape \[1, 9\] does not match feats shape"):
        torch.ops.fastuda.class_stats(feats, labels[:, :9], 2, 255, None, False)
    with pytest.raises(TypeError, match="weights must be float32"):
        torch.ops.fastuda.class_stats(feats, labels, 2, 255, w.double(), False)
    with pytest.raises(ValueError, match="compiled kernels|cannot run on|not implemented"):
        class_stats(feats[0].t(), labels[0], 2, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_flows(backend):
    dev = _device(backend)
    feats = torch.randn(2, 4, 3, 3, device=dev, requires_grad=True)
    labels = torch.randint(0, 2, (2, 3, 3), device=dev)
    for cov in ("diag", "full"):
        out = class_stats(feats, labels, 2, cov=cov, backend=backend)
        assert not any(t.requires_grad for t in out)


@needs_ext
@pytest.mark.parametrize("full_cov", [False, True])
def test_opcheck(full_cov):
    gen = torch.Generator().manual_seed(8)
    feats = torch.randn(2, 5, 12, generator=gen, requires_grad=True)
    labels = _labels((2, 12), 3, gen=gen)
    w = torch.rand(2, 12, generator=gen)
    for weights in (None, w):
        torch.library.opcheck(torch.ops.fastuda.class_stats.default,
                              (feats, labels, 3, 255, weights, full_cov))


@needs_ext
def test_torch_compile():
    class Centroids(torch.nn.Module):
        def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            stats = class_stats(feats, labels, 4, backend="cpu")
            return F.normalize(stats.mean, dim=1) + stats.var

    feats = torch.randn(2, 6, 5, 5)
    labels = torch.randint(0, 4, (2, 5, 5))
    compiled = torch.compile(Centroids(), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(feats, labels), Centroids()(feats, labels))
