"""BiPCL as cvlab-yonsei/DASS releases it, against an independent numpy transcription of the
release's ``metric_loss`` (trainer/damnet_trainer.py#L39-L112) and its pair average (#L143-L147).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastuda.config import ConfigError, load_config
from fastuda.engine.context import MethodContext
from fastuda.methods.bipcl import BiPCL, BiPCLSettings, direction_loss, reduce_pairs

REPO = Path(__file__).resolve().parents[2]
C, D = 4, 3


def make(**kw) -> BiPCL:
    kw.setdefault("feature", "embeddings")
    return BiPCL(BiPCLSettings(**kw), MethodContext(num_classes=C, embed_dim=D, backend="torch"))


# -- the release, one pair, in numpy -------------------------------------------------------------
def _nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """F.interpolate(mode="nearest"): source index floor(i * in / out)."""
    rows = np.floor(np.arange(size[0]) * a.shape[-2] / size[0]).astype(int)
    cols = np.floor(np.arange(size[1]) * a.shape[-1] / size[1]).astype(int)
    return a[..., rows, :][..., cols]


def _protos(f: np.ndarray, lbl: np.ndarray) -> np.ndarray:
    p = np.zeros((C, f.shape[0]))
    for c in np.unique(lbl):
        if c != 255:
            p[c] = f[:, lbl == c].mean(1)  # sum / count, #L57-L58
    return p


def _cos_logits(p: np.ndarray, f: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    pn = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    fn = f / np.maximum(np.linalg.norm(f, axis=0, keepdims=True), 1e-12)
    cs = np.einsum("cd,dhw->chw", pn, fn)
    cs[cs == 0] = -1  # #L62
    return _nearest(cs, size) * 10  # #L63-L64


def _weighted_ce(logits: np.ndarray, lbl: np.ndarray, overlap: set[int]) -> float:
    num = den = 0.0
    for y, x in zip(*np.nonzero(lbl != 255), strict=True):
        z = logits[:, y, x]
        nll = -(z[lbl[y, x]] - np.log(np.exp(z - z.max()).sum()) - z.max())
        w = 1.0 if int(lbl[y, x]) in overlap else 0.0  # CE weight 1 on shared classes, #L66-L71
        num, den = num + w * nll, den + w
    return num / den


def release_pair(fs: np.ndarray, ls: np.ndarray, ft: np.ndarray, lt: np.ndarray
                 ) -> tuple[float, float]:
    """(metric_loss1: target pixels vs source prototypes, metric_loss2: the other way)."""
    lsr, ltr = _nearest(ls, fs.shape[-2:]), _nearest(lt, ft.shape[-2:])
    overlap = (set(np.unique(lsr).tolist()) & set(np.unique(ltr).tolist())) - {255}
    l1 = _weighted_ce(_cos_logits(_protos(fs, lsr), ft, lt.shape), lt, overlap)
    l2 = _weighted_ce(_cos_logits(_protos(ft, ltr), fs, ls.shape), ls, overlap)
    return l1, l2


def pair_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    fs, ft = rng.normal(size=(2, D, 2, 2)), rng.normal(size=(2, D, 2, 2))
    # 4x4 labels on a 2x2 grid: the grid reads rows/cols 0 and 2; the others hold classes the
    # grid does not see (they enter the loss at label resolution, never a prototype)
    ls = np.array([[[0, 3, 1, 1], [0, 0, 1, 1], [2, 2, 255, 0], [2, 2, 0, 0]],
                   [[1, 1, 1, 1], [1, 1, 1, 1], [3, 3, 2, 2], [3, 3, 2, 255]]])
    lt = np.array([[[0, 0, 3, 3], [0, 2, 3, 3], [1, 1, 255, 255], [1, 1, 255, 255]],
                   [[2, 2, 1, 1], [2, 2, 1, 1], [2, 2, 0, 0], [2, 2, 0, 0]]])
    return fs, ls, ft, lt


def test_pair_losses_match_the_release_metric_loss() -> None:
    fs, ls, ft, lt = pair_case()
    m = make(weight=0.1, tau=0.1)
    got = m.pair_losses(torch.tensor(fs), torch.tensor(ls), torch.tensor(ft), torch.tensor(lt))
    pairs = [release_pair(fs[b], ls[b], ft[b], lt[b]) for b in range(2)]
    # lamb_metric1 = lamb_metric2 = 0.1 (config/damnet_config.yml#L16-L17), mean of the pairs
    assert float(got["tgt.contrast"]) == pytest.approx(0.1 * np.mean([p[0] for p in pairs]),
                                                       rel=1e-4)
    assert float(got["src.contrast"]) == pytest.approx(0.1 * np.mean([p[1] for p in pairs]),
                                                       rel=1e-4)


def test_gradient_flows_into_the_prototypes() -> None:
    # the target->source loss sees the source features only through the source prototypes:
    # its gradient w.r.t. them is the release's (central differences of the numpy transcription)
    fs, ls, ft, lt = pair_case()
    src = torch.tensor(fs, requires_grad=True)
    tgt = torch.tensor(ft, requires_grad=True)
    loss = make(weight=1.0).pair_losses(src, torch.tensor(ls), tgt, torch.tensor(lt))
    loss["tgt.contrast"].backward()
    assert src.grad is not None and src.grad.abs().sum() > 0

    def ref(f: np.ndarray) -> float:
        return float(np.mean([release_pair(f[b], ls[b], ft[b], lt[b])[0] for b in range(2)]))

    eps = 1e-5
    for idx in [(0, 0, 0, 0), (0, 2, 1, 0), (1, 1, 0, 1)]:
        plus, minus = fs.copy(), fs.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric = (ref(plus) - ref(minus)) / (2 * eps)
        assert float(src.grad[idx]) == pytest.approx(numeric, rel=2e-3, abs=1e-5)


def test_negatives_are_every_class_absent_ones_at_cosine_minus_one() -> None:
    # one pixel e_x of class 0; prototypes: class 0 = e_x (shared), class 1 = e_y (only in the
    # prototype's image), class 2 absent (zero prototype), class 3 absent
    feats = torch.tensor([1.0, 0.0, 0.0]).view(1, D, 1, 1)
    protos = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0], [0, 0, 0]])[None]
    present = torch.tensor([[True, True, False, False]])
    shared = torch.tensor([[True, False, False, False]])
    labels = torch.tensor([[[0, 1]]])  # on a 1x2 label grid: the class-1 pixel does not count
    total, count = direction_loss(feats, labels, protos, present, shared, tau=1.0)
    assert int(count) == 1
    assert float(total) == pytest.approx(-(1 - math.log(math.e + 1 + 2 / math.e)), rel=1e-6)
    total, count = direction_loss(feats, labels, protos, present, shared, tau=1.0,
                                  negatives="shared")
    assert int(count) == 1 and float(total) == pytest.approx(0.0, abs=1e-6)


def test_loss_is_counted_at_label_resolution() -> None:
    # a 1x1 feature map read by a 2x2 label: each label pixel gets the (nearest) upsampled logits
    feats = torch.tensor([1.0, 0.0, 0.0]).view(1, D, 1, 1)
    protos = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0], [0, 0, 0]])[None]
    present = torch.tensor([[True, True, True, False]])
    shared = torch.tensor([[True, True, False, False]])
    labels = torch.tensor([[[0, 1], [2, 255]]])  # class 2 not shared, one pixel ignored
    total, count = direction_loss(feats, labels, protos, present, shared, tau=1.0)
    z = [1.0, 0.0, 1 / math.sqrt(2), -1.0]
    lse = math.log(sum(math.exp(v) for v in z))
    assert int(count) == 2
    assert float(total) == pytest.approx((lse - z[0]) + (lse - z[1]), rel=1e-6)


def test_pairs_are_averaged_not_their_pixels() -> None:
    total, count = torch.tensor([2.0, 9.0]), torch.tensor([1, 3])
    assert float(reduce_pairs(total, count, "pair")) == pytest.approx((2 / 1 + 9 / 3) / 2)
    assert float(reduce_pairs(total, count, "pixel")) == pytest.approx(11 / 4)
    # a pair without a shared class adds 0 (the release's weighted CE divides 0 by 0 there)
    assert float(reduce_pairs(torch.tensor([2.0, 0.0]), torch.tensor([1, 0]), "pair")) == 1.0
    assert math.isnan(float(reduce_pairs(torch.tensor([2.0, 0.0]), torch.tensor([1, 0]), "pair",
                                         "nan")))


def test_a_pair_without_shared_classes() -> None:
    # pair 1's source has only class 3, its target none of it: zero by default, NaN as released
    fs, ls, ft, lt = pair_case()
    ls = ls.copy()
    ls[1] = 3
    args = (torch.tensor(fs), torch.tensor(ls), torch.tensor(ft), torch.tensor(lt))
    got = make().pair_losses(*args)
    l1, l2 = release_pair(fs[0], ls[0], ft[0], lt[0])
    assert float(got["tgt.contrast"]) == pytest.approx(0.1 * (l1 + 0.0) / 2, rel=1e-4)
    assert float(got["src.contrast"]) == pytest.approx(0.1 * (l2 + 0.0) / 2, rel=1e-4)
    released = make(empty_pair="nan").pair_losses(*args)
    assert math.isnan(float(released["tgt.contrast"]))


def test_presets_follow_the_release() -> None:
    cfg = load_config(REPO / "configs" / "bipcl" / "deeplabv2_gta2cs.toml")
    s = cfg.settings("bipcl")
    assert (s.prototypes, s.feature, s.negatives, s.resolution, s.reduction) == (
        "student", "aspp", "all", "label", "pair")
    assert s.label_transfer == "off" and s.calibration is False  # not active in the release
    assert (s.tau, s.weight) == (0.1, 0.1) and cfg.model.projection is False
    daformer = load_config(REPO / "configs" / "bipcl" / "daformer_gta2cs.toml")
    assert daformer.settings("bipcl").feature == "embeddings"


def test_aspp_feature_needs_deeplabv2_and_bad_values_are_errors() -> None:
    path = REPO / "configs" / "bipcl" / "daformer_gta2cs.toml"
    with pytest.raises(ConfigError, match="bipcl.feature"):
        load_config(path, ["bipcl.feature='aspp'"])
    with pytest.raises(ConfigError, match="negatives"):
        load_config(path, ["bipcl.negatives='some'"])


def test_loop_runs_the_pair_pass_with_student_features() -> None:
    from fastuda.config import Config, ModelConfig
    from fastuda.engine.self_training import SelfTraining
    from fastuda.methods import MethodStack
    from fastuda.models import build_model

    seen: list[bool] = []

    class Recording(BiPCL):
        def pair_losses(self, source_feats, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            seen.append(source_feats.requires_grad and source_feats.shape[1] == 4 * 19)
            return super().pair_losses(source_feats, *a, **k)

    cfg = Config(model=ModelConfig(name="deeplabv2", backbone="resnet18", projection=False))
    model = build_model(cfg.model)
    method = Recording(BiPCLSettings(), MethodContext(num_classes=19, backend="torch"))
    trainer = SelfTraining(cfg, model, MethodStack([method], method.ctx), torch.device("cpu"))
    assert [p.name for p in trainer.passes(0)] == ["src", "mix", "bipcl.pair"]
    assert not method.wants_teacher_source(0)  # no teacher prototypes in the released form
    g = torch.Generator().manual_seed(0)
    source = {"image": torch.randn(2, 3, 32, 32, generator=g),
              "label": torch.randint(0, 3, (2, 32, 32), generator=g)}
    result = trainer.step(source, {"image": torch.randn(2, 3, 32, 32, generator=g)}, 0)
    assert result.finite and seen == [True]
    assert {"bipcl.src.contrast", "bipcl.tgt.contrast", "mix.ce"} <= set(result.losses)
