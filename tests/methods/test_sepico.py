"""SePiCo's hooks against the op references and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastuda.engine.context import MethodContext
from fastuda.methods.sepico import SePiCo, SePiCoSettings
from fastuda.ops import reference

C, D = 4, 8


def make(variant: str = "dist", **kw) -> SePiCo:
    settings = SePiCoSettings(variant=variant, start_iter=5, tau=0.5, bank_size=3, **kw)
    return SePiCo(settings, MethodContext(num_classes=C, embed_dim=D, backend="torch"))


def batch(seed: int = 0) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(2, D, 4, 6, generator=g), dim=1)
    label = torch.randint(0, C, (2, 4, 6), generator=g).repeat_interleave(2, 1) \
        .repeat_interleave(2, 2)  # labels at stride 2, constant per cell
    return {"embeddings": emb}, label


def test_update_state_uses_downscaled_labels() -> None:
    m = make()
    out, label = batch()
    m.update_state(out, label, it=0)
    small = label[:, ::2, ::2]
    ref = reference.class_stats(out["embeddings"], small, C)
    assert torch.allclose(m.stats.count, ref.count)
    assert torch.allclose(m.stats.mean, ref.mean, atol=1e-6)
    assert torch.allclose(m.stats.var, ref.var, atol=1e-6)


def test_losses_start_at_start_iter_and_match_the_reference() -> None:
    m = make("dist")
    out, label = batch()
    m.update_state(out, label, it=0)
    assert m.source_losses(out, label, it=4) == {}
    losses = m.source_losses(out, label, it=5)
    small = label[:, ::2, ::2]
    expected = reference.dist_contrast(out["embeddings"], small, m.stats.mean, m.stats.var,
                                       tau=0.5, lam=1.0)
    assert float(losses["src.contrast"]) == pytest.approx(float(expected), rel=1e-5)


def test_regulariser_by_hand() -> None:
    m = make("proto")
    out, label = batch(1)
    m.update_state(out, label, it=0)
    emb, small = out["embeddings"], label[:, ::2, ::2]
    fbar = emb.permute(0, 2, 3, 1).reshape(-1, D).mean(0)  # every pixel valid here
    logits = [float(fbar @ m.stats.mean[c]) / 0.5 for c in range(C)]
    lse = math.log(sum(math.exp(v) for v in logits))
    expected = sum(v - lse for v in logits) / (C * math.log(C))
    assert float(m._regulariser(emb, small)) == pytest.approx(expected, rel=1e-5)


def test_bank_regulariser_uses_the_running_means_by_hand() -> None:
    # BIT-DA/SePiCo mmseg/models/losses/contrastive_loss.py#L286-L288: bank_contrastive's
    # regulariser is proto_reg(feat, mean) with mean = ProtoEstimator.Ave (sepico.py#L316-L320),
    # the running class means over every update, not the means of the bank's last centroids
    m = SePiCo(SePiCoSettings(variant="bank", start_iter=5, tau=0.05, bank_size=3),
               MethodContext(num_classes=C, embed_dim=D, backend="torch"))
    feats, labels = [], []
    for s in range(5):  # 5 updates, a bank of 3: the bank forgets the first two batches
        out, label = batch(s)
        if s < 2:  # batches the bank has forgotten, far from the later ones
            out = {"embeddings": -out["embeddings"]}
        m.update_state(out, label, it=s)
        feats.append(out["embeddings"].permute(0, 2, 3, 1).reshape(-1, D))
        labels.append(label[:, ::2, ::2].reshape(-1))
    f, y = torch.cat(feats).double(), torch.cat(labels)
    running = torch.stack([f[y == c].mean(0) for c in range(C)])  # pooled over all 5 batches
    out, label = batch(7)
    emb, small = out["embeddings"], label[:, ::2, ::2]
    fbar = emb.permute(0, 2, 3, 1).reshape(-1, D).double().mean(0)
    logp = torch.log_softmax(running @ fbar / 0.05, dim=0)
    expected = float(logp.sum()) / (C * math.log(C))
    assert float(m._regulariser(emb, small)) == pytest.approx(expected, rel=1e-5)
    # the bank's own means (what fastuda used before) give another value
    live = m.stats.bank[:, :3].double().mean(1)
    other = float(torch.log_softmax(live @ fbar / 0.05, dim=0).sum()) / (C * math.log(C))
    assert abs(other - expected) > 1e-3  # 100x the tolerance above
    # and it is the loss's reg term (weight 1)
    assert float(m.source_losses(out, label, 6)["src.reg"]) == pytest.approx(expected, rel=1e-5)


def test_target_ignores_zero_weight_rows() -> None:
    m = make("proto")
    out, label = batch(2)
    m.update_state(out, label, it=0)
    weight = torch.ones(label.shape)
    weight[:, :4] = 0  # the top two embedding rows
    got = m.target_losses(out, label, weight, it=10)["tgt.contrast"]
    small = label[:, ::2, ::2].clone()
    small[:, :2] = 255
    expected = reference.proto_contrast(out["embeddings"], small, m.stats.mean, tau=0.5)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_bank_variant_and_state_round_trip() -> None:
    m = make("bank")
    for s in range(4):
        out, label = batch(s)
        m.update_state(out, label, it=s)
    assert m.stats.bank_len.max() == 3  # ring buffer of 3 centroids per class
    state = m.state_dict()
    fresh = make("bank")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.stats.bank, m.stats.bank)
    assert torch.equal(fresh.stats.count, m.stats.count)
    out, label = batch(9)
    assert float(fresh.source_losses(out, label, 6)["src.contrast"]) == pytest.approx(
        float(m.source_losses(out, label, 6)["src.contrast"]))


def test_non_finite_teacher_source_skips_the_step_before_the_statistics() -> None:
    """A NaN source image: the step is skipped (not finite) and neither the class statistics nor
    the weights change; the next clean step trains and updates them."""
    from pathlib import Path

    from fastuda.config import load_config
    from fastuda.engine.self_training import SelfTraining
    from fastuda.methods import build_methods
    from fastuda.models import build_network

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "demo.toml", [
        "data.crop_size=[64, 64]", "model.embed_dim=16", "sepico.start_iter=0",
        "self_training.class_balanced_crop=false"])
    torch.manual_seed(0)
    model = build_network(cfg)
    method = build_methods(cfg, model, torch.device("cpu"))
    trainer = SelfTraining(cfg, model, method, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 5, (2, 4, 4), generator=g)  # 16x16 blocks: survive downscaling
    source = {"image": torch.randn(2, 3, 64, 64, generator=g),
              "label": blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)}
    target = {"image": torch.randn(2, 3, 64, 64, generator=g)}
    bad = {"image": torch.full_like(source["image"], float("nan")), "label": source["label"]}
    stats = [t.clone() for t in trainer.methods["sepico"].stats.stats()]
    weights = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    assert not trainer.step(bad, target, 0).finite
    assert all(torch.equal(a, b)
               for a, b in zip(stats, trainer.methods["sepico"].stats.stats(), strict=True))
    assert all(torch.equal(v, trainer.student.state_dict()[k]) for k, v in weights.items())
    assert trainer.step(source, target, 1).finite
    assert float(trainer.methods["sepico"].stats.stats()[0].sum()) > 0
