"""BiPCL: per-image prototypes, the pair contrast, label transfer and calibration, by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastuda.engine.context import MethodContext
from fastuda.methods.bipcl import BiPCL, BiPCLSettings, image_prototypes, pair_contrast

C, D = 3, 2


# fastuda's form before issue 13 (teacher prototypes, shared classes only, feature grid, one
# mean over the pixels of all pairs): the keys restoring it
EARLIER = {"prototypes": "teacher", "negatives": "shared", "resolution": "feature",
           "reduction": "pixel"}


def make(**kw) -> BiPCL:
    kw.setdefault("feature", "embeddings")
    return BiPCL(BiPCLSettings(**kw), MethodContext(num_classes=C, embed_dim=D, backend="torch"))


def unit(*xy: float) -> torch.Tensor:
    return F.normalize(torch.tensor(xy, dtype=torch.float32), dim=0)


def test_image_prototypes_are_normalised_per_image_means() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 4, 3, 3, generator=g)
    labels = torch.randint(0, C, (2, 3, 3), generator=g)
    labels[1][labels[1] == 2] = 255  # class 2 absent from image 1
    protos, present = image_prototypes(emb, labels, C)
    for b in range(2):
        for c in range(C):
            mask = labels[b] == c
            assert bool(present[b, c]) == bool(mask.any())
            if mask.any():
                mean = emb[b][:, mask].mean(1)
                assert torch.allclose(protos[b, c], F.normalize(mean, dim=0), atol=1e-6)


def test_pair_contrast_by_hand() -> None:
    # one image, prototypes of classes 0 and 1 usable (class 2 not): pixel features e_x, e_y
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).t().reshape(1, D, 1, 3)
    labels = torch.tensor([[[0, 1, 2]]])  # the class-2 pixel is left out
    protos = torch.stack([unit(1, 0), unit(0, 1), unit(-1, 0)])[None]
    usable = torch.tensor([[True, True, False]])
    tau = 0.5
    got = pair_contrast(emb, labels, protos, usable, tau=tau)
    # each counted pixel: similarity 1 to its own prototype, 0 to the other usable one
    expected = -(1 / tau - math.log(math.exp(1 / tau) + 1))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # nothing usable: zero, still connected to the graph
    emb.requires_grad_(True)
    zero = pair_contrast(emb, labels, protos, torch.zeros(1, C, dtype=torch.bool), tau=tau)
    zero.backward()
    assert float(zero.detach()) == 0.0 and emb.grad is not None


def step_inputs() -> tuple[dict, torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    # source image: class 0 on the left column (feature e_x), class 1 on the right (e_y)
    src_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).t().reshape(1, D, 1, 2)
    src_label = torch.tensor([[[0, 1]]])
    # target: pixel 0 close to class 0, pixel 1 close to class 1 but the teacher says 0
    tgt_emb = torch.stack([unit(0.9, 0.1), unit(0.2, 0.8)], 1).reshape(1, D, 1, 2)
    tgt_label = torch.tensor([[[0, 0]]])
    return ({"embeddings": src_emb}, src_label, {"embeddings": tgt_emb}, tgt_label,
            torch.ones(1, 1, 2))


@pytest.mark.parametrize("mode,expected", [("off", [0, 0]), ("agree", [0, 255]),
                                           ("replace", [0, 1])])
def test_label_transfer_modes(mode: str, expected: list[int]) -> None:
    m = make(label_transfer=mode, calibration=False, **EARLIER)
    src, src_label, tgt, tgt_label, weight = step_inputs()
    m.update_state(src, src_label, 0)
    label, w = m.refine_pseudo_labels(tgt, tgt_label, weight, 0)
    assert label[0, 0].tolist() == expected
    assert torch.equal(w, weight)


def test_calibration_offset_ema_and_matching() -> None:
    m = make(label_transfer="off", calibration=True, calibration_momentum=0.5, **EARLIER)
    src, src_label, tgt, tgt_label, weight = step_inputs()
    m.update_state(src, src_label, 0)
    m.refine_pseudo_labels(tgt, tgt_label, weight, 0)
    # target prototypes: class 0 = normalised mean of the two target pixels; classes in both
    # images: only 0 -> offset_0 = t_0 - s_0 (first time), offset_1 untouched
    t0 = F.normalize(tgt["embeddings"][0, :, 0].mean(1), dim=0)
    assert torch.allclose(m.offset[0], t0 - unit(1, 0), atol=1e-6)
    assert torch.equal(m.offset[1], torch.zeros(D)) and m.offset_seen.tolist() == [True, False,
                                                                                  False]
    first = m.offset[0].clone()
    m.update_state(src, src_label, 1)
    m.refine_pseudo_labels(tgt, tgt_label, weight, 1)
    assert torch.allclose(m.offset[0], 0.5 * first + 0.5 * (t0 - unit(1, 0)), atol=1e-6)
    # matching uses the calibrated source prototypes: shifting class 1's prototype far away
    m.offset[1] = torch.tensor([10.0, -10.0])  # calibrated p_1 ~ (1, -1)/sqrt2
    moved = m.transfer_labels(torch.stack([unit(0.1, 0.9)], 1).reshape(1, D, 1, 1))
    cal0 = F.normalize(unit(1, 0) + m.offset[0], dim=0)
    cal1 = F.normalize(unit(0, 1) + m.offset[1], dim=0)
    f = unit(0.1, 0.9)
    assert int(moved) == (0 if float(f @ cal0) > float(f @ cal1) else 1)


def test_losses_in_both_directions() -> None:
    # tau 1 here: at 0.1 these near-perfect matches give losses ~1e-4, below fp32 resolution
    m = make(label_transfer="off", calibration=False, tau=1.0, weight=0.1, start_iter=0,
             **EARLIER)
    src, src_label, tgt, tgt_label, weight = step_inputs()
    tgt_label = torch.tensor([[[0, 1]]])
    m.update_state(src, src_label, 0)
    m.refine_pseudo_labels(tgt, tgt_label, weight, 0)
    student_src = src["embeddings"].clone().requires_grad_(True)
    student_tgt = tgt["embeddings"].clone().requires_grad_(True)
    s_loss = m.source_losses({"embeddings": student_src}, src_label, 0)["src.contrast"]
    t_loss = m.target_losses({"embeddings": student_tgt}, tgt_label, weight, 0)["tgt.contrast"]
    # source pixels vs target prototypes (= the target pixels themselves: one per class)
    tp = [unit(0.9, 0.1), unit(0.2, 0.8)]

    def nll(f: torch.Tensor, protos: list[torch.Tensor], y: int) -> float:
        logit = [float(f @ p) / 1.0 for p in protos]
        return -(logit[y] - math.log(sum(math.exp(v) for v in logit)))

    expected_s = (nll(unit(1, 0), tp, 0) + nll(unit(0, 1), tp, 1)) / 2
    sp = [unit(1, 0), unit(0, 1)]
    expected_t = (nll(tp[0], sp, 0) + nll(tp[1], sp, 1)) / 2
    assert float(s_loss) == pytest.approx(0.1 * expected_s, rel=1e-5)
    assert float(t_loss) == pytest.approx(0.1 * expected_t, rel=1e-5)
    (s_loss + t_loss).backward()
    assert student_src.grad.abs().sum() > 0 and student_tgt.grad.abs().sum() > 0


def test_loop_makes_bipcl_pseudo_labels_before_the_source_pass() -> None:
    from fastuda.config import Config, ModelConfig
    from fastuda.engine.self_training import SelfTraining
    from fastuda.methods import MethodStack
    from fastuda.models import build_model

    calls: list[str] = []

    class Recording(BiPCL):
        def update_state(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            calls.append("update_state")
            return super().update_state(*a, **k)

        def refine_pseudo_labels(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            calls.append("refine")
            return super().refine_pseudo_labels(*a, **k)

        def source_losses(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            calls.append("source")
            losses = super().source_losses(*a, **k)
            assert "src.contrast" in losses
            return losses

        def target_losses(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            calls.append("target")
            return super().target_losses(*a, **k)

    cfg = Config(model=ModelConfig(name="deeplabv2", backbone="resnet18", embed_dim=8))
    model = build_model(cfg.model)
    method = Recording(BiPCLSettings(start_iter=0, feature="embeddings", **EARLIER),
                       MethodContext(num_classes=19, embed_dim=8, backend="torch"))
    trainer = SelfTraining(cfg, model, MethodStack([method], method.ctx), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    source = {"image": torch.randn(2, 3, 32, 32, generator=g),
              "label": torch.randint(0, 3, (2, 32, 32), generator=g)}
    result = trainer.step(source, {"image": torch.randn(2, 3, 32, 32, generator=g)}, 0)
    assert result.finite
    assert calls == ["update_state", "refine", "source", "target"]
    assert {"bipcl.src.contrast", "bipcl.tgt.contrast", "mix.ce"} <= set(result.losses)
