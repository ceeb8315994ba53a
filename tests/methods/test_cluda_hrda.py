"""CLUDA's multi-resolution pair weighting (a_i a_j within a view, 1 - a_i a_j across views)
against a per-pair loop written from the formula, on every available backend."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastuda import ops
from fastuda.engine.context import MethodContext
from fastuda.methods.cluda import CLUDA, CLUDASettings, multires_pair_contrast

BACKENDS = ["torch"] + (["cpu"] if ops.extension_available() else [])


def loop(feats: torch.Tensor, labels: torch.Tensor, a: torch.Tensor, r: torch.Tensor,
         q: torch.Tensor | None, tau: float) -> float:
    """l_i = -(1/|P_i|) sum_p w_ip [s_ip - log(exp(s_ip) + sum_n exp(s_in))], w_ip = q_i q_p a_i a_p
    for pixels of the same view (r_i = r_p), q_i q_p (1 - a_i a_p) across views; mean over the
    anchors with a positive."""
    B, D, H, W = feats.shape
    idx = [(b, y, x) for b in range(B) for y in range(H) for x in range(W)]
    f = [F.normalize(feats[b, :, y, x].double(), dim=0) for b, y, x in idx]
    lab = [int(labels[i]) for i in idx]
    aa = [float(a[i]) for i in idx]
    rr = [float(r[i]) for i in idx]
    qq = [1.0 if q is None else float(q[i]) for i in idx]
    total, anchors = 0.0, 0
    for i in range(len(idx)):
        if lab[i] == 255:
            continue
        pos = [p for p in range(len(idx)) if p != i and lab[p] == lab[i]]
        neg = [n for n in range(len(idx)) if lab[n] not in (255, lab[i])]
        if not pos:
            continue
        neg_sum = sum(math.exp(float(f[i] @ f[n]) / tau) for n in neg)
        li = 0.0
        for p in pos:
            w = aa[i] * aa[p] if rr[i] == rr[p] else 1.0 - aa[i] * aa[p]
            s = float(f[i] @ f[p]) / tau
            li -= qq[i] * qq[p] * w * (s - math.log(math.exp(s) + neg_sum))
        total += li / len(pos)
        anchors += 1
    return total / anchors


def case(seed: int):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(4, 5, 2, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (4, 2, 3), generator=g)
    labels[1, 0, :2] = 255
    a = torch.rand(4, 2, 3, generator=g, dtype=torch.float64)
    r = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)[:, None, None].expand(4, 2, 3)
    q = torch.rand(4, 2, 3, generator=g, dtype=torch.float64)
    return feats, labels, a, r.contiguous(), q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_q", [False, True])
def test_three_calls_equal_the_pair_loop(backend: str, with_q: bool) -> None:
    feats, labels, a, r, q = case(0)
    q = q if with_q else None
    got = multires_pair_contrast(feats, labels, a, r, q, tau=0.5, backend=backend)
    assert float(got) == pytest.approx(loop(feats, labels, a, r, q, 0.5), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_a_dense_formulation(backend: str) -> None:
    feats, labels, a, r, q = case(1)

    def dense(f: torch.Tensor, a_: torch.Tensor) -> torch.Tensor:
        fv = F.normalize(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), dim=1)
        y, av, rv, qv = labels.reshape(-1), a_.reshape(-1), r.reshape(-1), q.reshape(-1)
        keep = y != 255
        fv, y, av, rv, qv = fv[keep], y[keep], av[keep], rv[keep], qv[keep]
        s = fv @ fv.t() / 0.5
        eye = torch.eye(len(y), dtype=torch.bool)
        pos, neg = (y[:, None] == y[None]) & ~eye, y[:, None] != y[None]
        lse = torch.logsumexp(s.masked_fill(~neg, float("-inf")), 1, keepdim=True)
        term = s - torch.logaddexp(s, lse)
        aa = av[:, None] * av[None]
        w = torch.where(rv[:, None] == rv[None], aa, 1 - aa) * qv[:, None] * qv[None]
        per = -(w * term * pos).sum(1) / pos.sum(1).clamp_min(1)
        has = pos.any(1)
        return per[has].mean()

    f1, a1 = feats.clone().requires_grad_(), a.clone().requires_grad_()
    multires_pair_contrast(f1, labels, a1, r, q, tau=0.5, backend=backend).backward()
    f2, a2 = feats.clone().requires_grad_(), a.clone().requires_grad_()
    dense(f2, a2).backward()
    assert torch.allclose(f1.grad, f2.grad, atol=1e-10)
    assert torch.allclose(a1.grad, a2.grad, atol=1e-10)


def test_cluda_reads_hrda_outputs() -> None:
    """CLUDA on HRDA outputs: context pixels (whole-crop labels) and detail pixels (labels of the
    box) on the grid, a from CLUDA's own pair-weight head on each view's features (never HRDA's
    fusion attention: NaN here), the mixed weights cropped alike."""
    g = torch.Generator().manual_seed(2)
    B, grid = 2, (2, 2)
    nan = torch.full((B, 1, 2, 2), float("nan"))
    out = {"features": torch.randn(B, 4, 2, 2, generator=g),
           "features_detail": torch.randn(B, 4, 2, 2, generator=g),
           "attention_context": nan, "attention_detail": nan, "attention": nan,
           "detail_box": torch.tensor([0, 4, 4, 8])}
    labels = torch.randint(0, 3, (B, 8, 8), generator=g)
    weight = torch.rand(B, 8, 8, generator=g)
    torch.manual_seed(0)
    m = CLUDA(CLUDASettings(grid=list(grid), tau=0.7, weight=2.0, head_channels=3,
                            multires_loss="three_term"),
              MethodContext(num_classes=3, backend="torch", feature_channels=4,
                            multi_resolution=True))
    feats = torch.cat([out["features"], out["features_detail"]])
    lbl = torch.cat([labels[:, ::4, ::4], labels[:, 0:4, 4:8][:, ::2, ::2]])  # nearest
    with torch.no_grad():  # the features are already on the 2x2 grid: bilinear is the identity
        head = m.weight_head
        a = torch.cat([torch.sigmoid(head.out(head.conv(out["features"])))[:, 0],
                       torch.sigmoid(head.out(head.conv(out["features_detail"])))[:, 0]])
    r = torch.cat([torch.ones(B, *grid), -torch.ones(B, *grid)])
    q = torch.cat([weight[:, ::4, ::4], weight[:, 0:4, 4:8][:, ::2, ::2]])
    src = m.source_losses(out, labels, 0)["src.contrast"]
    assert float(src.detach()) == pytest.approx(loop(feats, lbl, a, r, None, 0.7), rel=1e-5)
    mix = m.mixed_losses(out, labels, weight, 0)["mix.contrast"]
    assert float(mix.detach()) == pytest.approx(loop(feats, lbl, a, r, q, 0.7), rel=1e-5)


def test_single_resolution_cluda_has_no_head() -> None:
    m = CLUDA(CLUDASettings(), MethodContext(num_classes=3, backend="torch"))
    assert m.weight_head is None and not list(m.parameters())
    out = {"features": torch.randn(1, 4, 2, 2), "features_detail": torch.randn(1, 4, 2, 2),
           "detail_box": torch.tensor([0, 4, 0, 4])}
    with pytest.raises(RuntimeError, match="pair-weight head"):
        m.source_losses(out, torch.zeros(1, 8, 8, dtype=torch.long), 0)


def test_contrast_trains_the_weight_head_not_the_fusion_attention() -> None:
    """On a real HRDA network the contrast's gradient reaches CLUDA's head and the features, and
    leaves HRDA's scale attention (the fusion) alone; the head is in the method's state_dict."""
    from fastuda.config import HRDAConfig, ModelConfig
    from fastuda.models import HRDAModel, build_model

    torch.manual_seed(0)
    net = build_model(ModelConfig(name="deeplabv2", backbone="resnet18", num_classes=3,
                                  projection=False))
    model = HRDAModel(net, HRDAConfig(enabled=True, detail_crop=[32, 32], attention_channels=8))
    m = CLUDA(CLUDASettings(grid=[4, 4], head_channels=8, multires_loss="three_term"),
              MethodContext(num_classes=3, backend="torch",
                            feature_channels=model.feature_channels, multi_resolution=True))
    out = model.train()(torch.randn(2, 3, 64, 64), box=(16, 48, 0, 32))
    labels = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    m.source_losses(out, labels, 0)["src.contrast"].backward()
    assert all(p.grad is None for p in model.attention_head.parameters())
    assert m.weight_head.out.weight.grad.abs().sum() > 0
    assert m.weight_head.conv[0].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    keys = set(m.state_dict())
    assert {"weight_head.out.weight", "weight_head.conv.1.running_mean"} <= keys


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_three_calls_on_the_cuda_backend(dtype: torch.dtype) -> None:
    """The multi-resolution weighting (negative pair weights u = q r a on the detail pixels)
    through the CUDA kernels against the torch reference on the GPU: loss, feature and a grads."""
    feats, labels, a, r, q = (t.cuda() for t in case(3))
    feats = feats.to(dtype)
    results = {}
    for backend in ("cuda", "torch"):
        f, aa = feats.clone().requires_grad_(), a.to(dtype).clone().requires_grad_()
        loss = multires_pair_contrast(f, labels, aa, r.to(dtype), q.to(dtype), tau=0.5,
                                      backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), f.grad, aa.grad)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for got, want in zip(results["cuda"], results["torch"], strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    want = loop(feats.cpu().double(), labels.cpu(), a.cpu(), r.cpu(), q.cpu(), 0.5)
    assert float(results["cuda"][0]) == pytest.approx(want, rel=tol * 10)
