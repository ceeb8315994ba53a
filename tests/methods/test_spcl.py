"""SPCL: thresholds, EMA prototypes of correct pixels and the contrast, by hand and by formula."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastuda.config import ConfigError, load_config
from fastuda.engine.context import MethodContext, StepView
from fastuda.engine.self_training import SelfTraining
from fastuda.methods import build_methods
from fastuda.methods.spcl import (
    SPCL,
    SPCLSettings,
    class_median_thresholds,
    confidence_histogram,
    histogram_thresholds,
)
from fastuda.models import build_network

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo_spcl.toml"

C, D = 3, 4


def make(**kw) -> SPCL:
    # the hand-built cases below feed "embeddings" (fastuda's earlier feature), threshold per
    # batch and start the EMA at the first batch (the earlier rules); the released feature,
    # stream thresholds and mean initialisation have their own tests
    kw.setdefault("feature", "embeddings")
    kw.setdefault("threshold_scope", "batch")
    kw.setdefault("prototype_init", "first_batch")
    return SPCL(SPCLSettings(**kw), MethodContext(num_classes=C, embed_dim=D, backend="torch"))


def test_class_median_thresholds_by_hand() -> None:
    conf = torch.tensor([[0.2, 0.5, 0.9, 0.95, 0.99, 0.97, 0.98, 0.1]])
    label = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0]])
    valid = torch.ones_like(label, dtype=torch.bool)
    valid[0, 7] = False  # the 0.1 pixel does not count
    thr = class_median_thresholds(conf, label, C, cap=0.9, valid=valid)
    # class 0: [0.2, 0.5, 0.9, 0.95] -> lower median 0.5; class 1: median 0.98 capped at 0.9;
    # class 2: no pixel -> the cap
    assert thr.tolist() == pytest.approx([0.5, 0.9, 0.9])
    # agrees with torch.median per class on random data
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(2, 5, 7, generator=g)
    label = torch.randint(0, C, (2, 5, 7), generator=g)
    thr = class_median_thresholds(conf, label, C, cap=1.0)
    for c in range(C):
        assert float(thr[c]) == pytest.approx(float(conf[label == c].median()))


def test_prototypes_are_an_ema_of_correct_pixels() -> None:
    m = make(momentum=0.1, start_iter=10)
    emb = F.normalize(torch.randn(1, D, 2, 2), dim=1)
    label = torch.tensor([[[0, 0], [1, 1]]])
    logits = torch.zeros(1, C, 2, 2)
    logits[0, 0, 0, :] = 5  # predicts 0 on row 0 (correct)
    logits[0, 2, 1, 0] = 5  # predicts 2 at (1, 0): wrong, left out
    logits[0, 1, 1, 1] = 5  # predicts 1 at (1, 1): correct
    assert m.source_losses({"embeddings": emb, "logits": logits}, label, 0) == {}  # warm-up
    first = {0: emb[0, :, 0, :].mean(1), 1: emb[0, :, 1, 1]}
    assert torch.allclose(m.prototypes.mean[0], first[0], atol=1e-6)
    assert torch.allclose(m.prototypes.mean[1], first[1], atol=1e-6)
    assert torch.equal(m.prototypes.mean[2], torch.zeros(D))
    emb2 = F.normalize(torch.randn(1, D, 2, 2), dim=1)
    label2 = torch.zeros(1, 2, 2, dtype=torch.long)
    logits2 = torch.zeros(1, C, 2, 2)
    logits2[0, 0] = 5  # all correct, class 0 only
    m.source_losses({"embeddings": emb2, "logits": logits2}, label2, 1)
    expected0 = 0.1 * first[0] + 0.9 * emb2[0].flatten(1).mean(1)
    assert torch.allclose(m.prototypes.mean[0], expected0, atol=1e-6)
    assert torch.allclose(m.prototypes.mean[1], first[1], atol=1e-6)  # absent: unchanged
    # checkpoint round trip
    other = make(momentum=0.1)
    other.load_state_dict(m.state_dict())
    assert torch.equal(other.prototypes.mean, m.prototypes.mean)


def test_source_and_target_contrast_by_formula() -> None:
    tau = 0.5
    m = make(tau=tau, start_iter=0, source_weight=2.0, threshold_cap=0.9)
    g = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(1, D, 1, 4, generator=g), dim=1)
    label = torch.tensor([[[0, 1, 2, 1]]])
    logits = F.one_hot(torch.tensor([[[0, 1, 2, 0]]]), C).permute(0, 3, 1, 2).float() * 4
    loss = m.source_losses({"embeddings": emb, "logits": logits}, label, 0)["src.contrast"]
    P = m.prototypes.mean  # pixel 3 is wrong (predicted 0): out of prototypes and loss

    def nll(f: torch.Tensor, y: int) -> float:
        logit = [float(f @ P[c]) / tau for c in range(C)]
        return -(logit[y] - math.log(sum(math.exp(v) for v in logit)))

    expected = sum(nll(emb[0, :, 0, x], y) for x, y in ((0, 0), (1, 1), (2, 2))) / 3
    assert float(loss) == pytest.approx(2.0 * expected, rel=1e-5)

    # target: a pixel below its class's median confidence is left out of the contrast
    t_logits = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0],
                             [0.0, 2.0, 0.0]]).t().reshape(1, C, 1, 4)
    plabel = t_logits.argmax(1)
    weight = torch.ones(1, 1, 4)
    m.refine_pseudo_labels({"logits": t_logits}, plabel, weight, 0)
    losses = m.target_losses({"embeddings": emb}, plabel, weight, 0)
    # class 0: confidences {high, low} -> median = low: both kept; class 1: equal: both kept
    expected_t = sum(nll(emb[0, :, 0, x], int(plabel[0, 0, x])) for x in range(4)) / 4
    assert float(losses["tgt.contrast"]) == pytest.approx(expected_t, rel=1e-5)


def test_target_thresholds_median_and_cap() -> None:
    # class 0 confidences 0.909 > 0.787 > 0.576 (softmax of 3, 2, 1 against two zeros): median
    # 0.787 leaves the third pixel out; class 1 has one pixel (its own median); cap 0.5 keeps all
    t_logits = torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 0.0, 0.0],
                             [0.0, 2.0, 0.0]]).t().reshape(1, C, 1, 4)
    plabel = t_logits.argmax(1)
    weight = torch.ones(1, 1, 4)
    m = make(threshold_cap=0.9)
    assert m.refine_pseudo_labels({"logits": t_logits}, plabel, weight, 0) == (plabel, weight)
    assert m._target_label[0, 0].tolist() == [0, 0, 255, 1]
    m = make(threshold_cap=0.5)
    m.refine_pseudo_labels({"logits": t_logits}, plabel, weight, 0)
    assert m._target_label[0, 0].tolist() == [0, 0, 0, 1]
    # an ignored pixel leaves the labels and the thresholds: class 0 is then {0.787, 0.576},
    # lower median 0.576, so the third pixel is kept
    weight[0, 0, 0] = 0
    m = make(threshold_cap=0.9)
    m.refine_pseudo_labels({"logits": t_logits}, plabel, weight, 0)
    assert m._target_label[0, 0].tolist() == [255, 0, 0, 1]


def make_trainer(*extra: str) -> SelfTraining:
    cfg = load_config(DEMO, ["data.crop_size=[64, 64]", "optim.warmup_iters=0",
                             "spcl.start_iter=0", *extra])
    torch.manual_seed(0)
    model = build_network(cfg)
    return SelfTraining(cfg, model, build_methods(cfg, model, torch.device("cpu")),
                        torch.device("cpu"))


@pytest.mark.parametrize("scale", [1.8, 1.0])
def test_loop_source_ce_is_on_logits_over_the_scale(scale: float) -> None:
    # BinhuiXie/SPCL train_ours.py#L155: seg_criterion(src_pred.div(1.8), src_label); 1.0 is
    # fastuda's earlier plain CE. The contrast still sees the raw logits (its correct-pixel mask).
    trainer = make_trainer(f"spcl.source_logit_scale={scale}")
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 64, 64, generator=g)
    label = torch.randint(0, 4, (2, 64, 64), generator=g)  # no ignored pixel: any average
    out = trainer.student(image)
    view = StepView(0, {}, {}, source_image=image, source_label=label)
    losses = trainer._source_losses(out, view)
    logits = F.interpolate(out["logits"].float(), size=(64, 64), mode="bilinear",
                           align_corners=False)
    expected = F.cross_entropy(logits.detach() / scale, label)
    assert float(losses["src.ce"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert "spcl.src.contrast" in losses


def test_source_logit_scale_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="spcl.source_logit_scale"):
        load_config(DEMO, ["spcl.source_logit_scale=0"])


def test_backbone_feature_is_the_l2_normalised_last_stage() -> None:
    # BinhuiXie/SPCL train_ours.py#L169-L173 (prototypes of F.normalize(src_feat)), loss.py#L30-L38
    # (the contrast on F.normalize of the 2048-d layer-4 map): by hand on an un-normalised map
    m = SPCL(SPCLSettings(tau=0.5, momentum=0.1), MethodContext(num_classes=C, backend="torch"))
    assert m.prototypes is None  # its width comes with the first batch
    feat = torch.tensor([[[[3.0, 0.0]], [[4.0, 2.0]]]])  # [1, 2, 1, 2]: (3, 4) and (0, 2)
    label = torch.tensor([[[0, 1]]])
    logits = F.one_hot(label, C).permute(0, 3, 1, 2).float() * 5  # both correct
    loss = m.source_losses({"backbone": feat, "logits": logits}, label, 0)["src.contrast"]
    P = torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.0, 0.0]])
    assert torch.allclose(m.prototypes.mean, P, atol=1e-6)
    f = P[:2]  # the unit features are the prototypes themselves here
    logit = f @ P.t() / 0.5
    expected = F.cross_entropy(logit, torch.tensor([0, 1]))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # checkpoint round trip into a method that has not seen a batch yet
    other = SPCL(SPCLSettings(), MethodContext(num_classes=C, backend="torch"))
    other.load_state_dict(m.state_dict())
    assert torch.equal(other.prototypes.mean, m.prototypes.mean)


def test_feature_key_is_checked() -> None:
    with pytest.raises(ConfigError, match="spcl.feature"):
        load_config(DEMO, ["spcl.feature='layer3'"])
    with pytest.raises(ConfigError, match="deeplabv2"):
        load_config(DEMO, ["spcl.feature='backbone'", "model.name='daformer'",
                           "model.backbone='mit_b0'", "model.output_stride=0"])
    with pytest.raises(ConfigError, match="projection"):
        load_config(DEMO, ["spcl.feature='embeddings'", "model.projection=false"])
    preset = load_config(DEMO.parent / "spcl" / "deeplabv2_gta2cs.toml")
    assert preset.settings("spcl").feature == "backbone" and not preset.model.projection


def released_thresholds(conf: np.ndarray, label: np.ndarray, num_classes: int,
                        cap: float) -> np.ndarray:
    """BinhuiXie/SPCL core/utils/pseudo_label.py#L34-L44, restated: per class the sorted
    confidences' value at index round(0.5 n), 0 for an absent class, capped."""
    thr = []
    for c in range(num_classes):
        x = np.sort(conf[label == c])
        thr.append(x[int(np.round(len(x) * 0.5))] if len(x) else 0.0)
    return np.minimum(np.array(thr), cap)


def test_histogram_thresholds_follow_the_released_rank() -> None:
    g = torch.Generator().manual_seed(5)
    conf = torch.rand(4, 9, 11, generator=g, dtype=torch.float64)
    label = torch.randint(0, C + 1, (4, 9, 11), generator=g)  # class 3 = C: out of range
    label[0, 0, :3] = 255
    bins = 100_000
    thr = histogram_thresholds(confidence_histogram(conf, label, C, bins), cap=0.9)
    ref = released_thresholds(conf.numpy(), label.numpy(), C, 0.9)
    # the lower edge of the bin holding the released value
    assert thr.double().tolist() == pytest.approx((np.floor(ref * bins) / bins).tolist(),
                                                  abs=1e-6)
    # small counts by hand: n = 3 -> index round(1.5) = 2 (the maximum), n = 2 -> index 1,
    # n = 1 -> index 0, n = 0 -> 0; cap 0.9
    conf = torch.tensor([[0.15, 0.55, 0.35, 0.25, 0.45, 0.95]])
    label = torch.tensor([[0, 0, 0, 1, 1, 2]])
    thr = histogram_thresholds(confidence_histogram(conf, label, 4, 10), cap=0.9)
    assert thr.tolist() == pytest.approx([0.5, 0.4, 0.9, 0.0])


def test_stream_thresholds_accumulate_over_target_batches() -> None:
    m = make(threshold_scope="stream", threshold_bins=10, threshold_cap=0.9)

    def batch(confs: list[float]) -> tuple[dict, torch.Tensor, torch.Tensor]:
        # class 0 with these confidences (> 1 / C: class 0 is the argmax) against C - 1 equal
        # classes: logit log(p (C - 1) / (1 - p)) against 0
        p = torch.tensor(confs, dtype=torch.float64)
        logits = torch.zeros(1, C, 1, len(confs), dtype=torch.float64)
        logits[0, 0, 0] = torch.log(p * (C - 1) / (1 - p))
        return {"logits": logits.float()}, torch.zeros(1, 1, len(confs), dtype=torch.long), \
            torch.ones(1, 1, len(confs))

    out, plabel, weight = batch([0.45, 0.55, 0.75])
    m.refine_pseudo_labels(out, plabel, weight, 0)  # n = 3: index 2 -> 0.75, bin edge 0.7
    assert m._target_label[0, 0].tolist() == [255, 255, 0]
    out, plabel, weight = batch([0.95, 0.35])
    m.refine_pseudo_labels(out, plabel, weight, 1)
    # the stream {0.35, 0.45, 0.55, 0.75, 0.95}: index round(2.5) = 2 -> 0.55, edge 0.5; the
    # batch alone (its lower median 0.35) would keep both
    assert m._target_label[0, 0].tolist() == [0, 255]
    assert m.confidence_hist[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 1, 0, 1]
    other = make(threshold_scope="stream", threshold_bins=10)
    other.load_state_dict(m.state_dict())  # checkpointed
    assert torch.equal(other.confidence_hist, m.confidence_hist)
    with pytest.raises(ConfigError, match="spcl.threshold_scope"):
        load_config(DEMO, ["spcl.threshold_scope='epoch'"])


def unit_batch(vectors: list[list[float]], labels: list[int]) -> tuple[dict, torch.Tensor]:
    """A [1, D, 1, N] batch of these (normalised) features, all predicted correctly."""
    feats = torch.tensor(vectors, dtype=torch.float32).t().reshape(1, D, 1, len(labels))
    emb = F.normalize(feats, dim=1)
    label = torch.tensor([[labels]])
    logits = F.one_hot(label, C).permute(0, 3, 1, 2).float() * 5
    return {"embeddings": emb, "logits": logits}, label


def test_prototypes_start_from_the_mean_of_batch_means_before_start_iter() -> None:
    # BinhuiXie/SPCL semantic_prototype.py#L80-L98: per class the mean of the per-batch means;
    # train_ours.py#L174-L182: the first contrast step already applies the EMA to them
    e = torch.eye(D)
    batches = [unit_batch([[1, 1, 0, 0]], [0]),  # it 0: before the window, not counted
               unit_batch([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], [0, 0, 1]),  # it 1
               unit_batch([[0, 0, 0, 1]], [0]),  # it 2 (class 1 absent)
               unit_batch([[0, 0, 1, 1]], [0])]  # it 3 = start_iter
    m = make(momentum=0.1, start_iter=3, prototype_init="mean", prototype_init_batches=2)
    assert m.init_window() == (1, 3)
    for it in range(3):
        assert m.source_losses(*batches[it], it) == {}
        if it == 1:  # checkpoint in the middle of the window
            resumed = make(momentum=0.1, start_iter=3, prototype_init="mean",
                           prototype_init_batches=2)
            resumed.load_state_dict(m.state_dict())
    assert torch.equal(m.prototypes.mean, torch.zeros(C, D))  # no EMA before start_iter
    init0 = ((e[0] + e[1]) / 2 + e[3]) / 2  # batch means, not the pixel mean (e0 + e1 + e3) / 3
    m_d = F.normalize(torch.tensor([0.0, 0, 1, 1]), dim=0)
    for method in (m, resumed):
        if method is resumed:
            method.source_losses(*batches[2], 2)
        losses = method.source_losses(*batches[3], 3)
        assert "src.contrast" in losses
        assert torch.allclose(method.prototypes.mean[0], 0.1 * init0 + 0.9 * m_d, atol=1e-6)
        assert torch.allclose(method.prototypes.mean[1], e[2], atol=1e-6)  # absent at it 3
        assert torch.equal(method.prototypes.mean[2], torch.zeros(D))  # never seen
    # "first_batch" (fastuda's earlier rule): the EMA runs from iteration 0
    old = make(momentum=0.1, start_iter=3, prototype_init="first_batch",
               prototype_init_batches=2)
    old.source_losses(*batches[0], 0)
    assert torch.allclose(old.prototypes.mean[0], F.normalize(e[0] + e[1], dim=0), atol=1e-6)
    with pytest.raises(ConfigError, match="spcl.prototype_init"):
        load_config(DEMO, ["spcl.prototype_init='file'"])


def test_loop_runs_the_window_then_the_contrast() -> None:
    # in the loop: no SPCL loss and no prototype before start_iter, the window's mean at it
    trainer = make_trainer("spcl.start_iter=2", "spcl.prototype_init_batches=1")
    spcl = trainer.methods["spcl"]
    logged = []
    for it in range(3):
        g = torch.Generator().manual_seed(10 + it)
        image = torch.randn(2, 3, 64, 64, generator=g)
        with torch.no_grad():  # labels the student gets right, so the prototypes see pixels
            logits = trainer.student.train()(image)["logits"]
        label = F.interpolate(logits, size=(64, 64), mode="bilinear").argmax(1)
        src = {"image": image, "label": label}
        result = trainer.step(src, {"image": torch.randn(2, 3, 64, 64, generator=g)}, it)
        assert result.finite
        logged.append({k for k in result.losses if k.startswith("spcl.")})
        if it == 1:  # the window's sums are there, the prototypes untouched
            assert spcl._init_sum is not None and spcl._init_batches.any()
            assert not spcl.prototypes.mean.any()
    assert logged[:2] == [set(), set()]
    assert {"spcl.src.contrast", "spcl.tgt.contrast"} <= logged[2]
    assert spcl._init_sum is None and spcl.prototypes.mean.any()
