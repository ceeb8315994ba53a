"""The DeepLab-V2 releases' optimiser and BN settings (issue 13, docs/recipes.md sections 7-9):
``optim.name = "sgd"`` against ``torch.optim.SGD`` and a hand computation, the poly horizon
``optim.poly_iters``, and ``model.freeze_bn`` (running statistics frozen, the teacher's too)."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastuda.config import ConfigError, ModelConfig, OptimConfig, load_config
from fastuda.engine.self_training import SelfTraining, build_optimizer, set_teacher_mode
from fastuda.methods import build_methods
from fastuda.models import build_model, build_network

REPO = Path(__file__).resolve().parents[2]


def tiny_model(**kw: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="deeplabv2", backbone="resnet18", num_classes=3,
                                   projection=False, **kw))


def test_sgd_step_equals_torch_sgd_with_the_released_groups() -> None:
    """One step of optim.name = "sgd" is torch.optim.SGD(momentum 0.9, wd 5e-4) over two groups:
    the backbone at lr, the classifier at 10 lr (SPCL train_ours.py#L75-L80)."""
    o = OptimConfig(name="sgd", lr=2.5e-4, head_lr_mult=10.0, momentum=0.9, weight_decay=5e-4)
    a = tiny_model()
    b = copy.deepcopy(a)
    opt_a = build_optimizer(o, a.param_groups(o.lr, o.head_lr_mult, o.weight_decay),
                            torch.device("cpu"))
    assert isinstance(opt_a, torch.optim.SGD)
    # hand-checked lr per group: 2.5e-4 for every backbone parameter, 2.5e-3 for the head
    lrs = {id(p): g["lr"] for g in opt_a.param_groups for p in g["params"]}
    for name, p in a.named_parameters():
        assert lrs[id(p)] == pytest.approx(2.5e-4 if name.startswith("backbone.") else 2.5e-3)
        assert next(g for g in opt_a.param_groups if any(q is p for q in g["params"])
                    )["weight_decay"] == 5e-4  # the releases decay every parameter
    backbone = [p for n, p in b.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in b.named_parameters() if not n.startswith("backbone.")]
    opt_b = torch.optim.SGD([{"params": backbone, "lr": 2.5e-4},
                             {"params": head, "lr": 2.5e-3}],
                            lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(2))
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(2):  # two steps: the momentum buffer enters the second
            opt.zero_grad()
            F.cross_entropy(model(x)["logits"], y).backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_sgd_update_by_hand() -> None:
    """Two steps on one scalar, by hand: buf_1 = g + wd p_0, p_1 = p_0 - lr buf_1;
    buf_2 = m buf_1 + g + wd p_1, p_2 = p_1 - lr buf_2 (no dampening, no Nesterov)."""
    p = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    o = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.5)
    opt = build_optimizer(o, [{"params": [p], "lr": 0.1, "weight_decay": 0.5}],
                          torch.device("cpu"))
    for _ in range(2):
        opt.zero_grad()
        (3.0 * p).sum().backward()  # gradient 3
        opt.step()
    buf1 = 3.0 + 0.5 * 2.0  # 4
    p1 = 2.0 - 0.1 * buf1  # 1.6
    buf2 = 0.9 * buf1 + 3.0 + 0.5 * p1  # 7.4
    assert float(p.detach()) == pytest.approx(p1 - 0.1 * buf2, abs=1e-12)  # 0.86


def test_optimiser_name_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"optim\.name: 'adam'"):
        load_config(REPO / "configs" / "demo.toml", ["optim.name=adam"])
    with pytest.raises(ConfigError, match=r"optim\.momentum"):
        load_config(REPO / "configs" / "demo.toml", ["optim.momentum=1.0"])
    # a horizon shorter than the run would make the poly factor negative
    with pytest.raises(ConfigError, match=r"optim\.poly_iters: 500"):
        load_config(REPO / "configs" / "demo.toml", ["optim.poly_iters=500", "train.max_iters=600"])


def set_lr_at(cfg_overrides: list[str], its: list[int]) -> list[float]:
    cfg = load_config(REPO / "configs" / "demo.toml", cfg_overrides)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": cfg.optim.lr, "initial_lr": cfg.optim.lr}],
                          lr=cfg.optim.lr)
    trainer = types.SimpleNamespace(cfg=cfg, optimizer=opt)  # set_lr reads only these
    return [SelfTraining.set_lr(trainer, it) for it in its]  # type: ignore[arg-type]


def test_poly_horizon_apart_from_the_stop_iteration() -> None:
    """SPCL: lr(it) = 2.5e-4 (1 - it / 62 500) ** 0.9, stopped at 40 000
    (core/solver/build.py#L4-L9, configs/deeplabv2_r101_cl.yaml#L17-L18)."""
    sets = ["optim.name=sgd", "optim.lr=2.5e-4", "optim.warmup_iters=0", "optim.poly_power=0.9",
            "optim.poly_iters=62500", "train.max_iters=40000"]
    its = [0, 1000, 20000, 39999]
    want = [2.5e-4 * (1 - it / 62500) ** 0.9 for it in its]
    assert set_lr_at(sets, its) == pytest.approx(want, rel=1e-12)
    # at the last iteration the lr is still 2.5e-4 * (22 501 / 62 500) ** 0.9 = 9.97e-5, not ~0
    assert set_lr_at(sets, [39999])[0] == pytest.approx(9.968e-5, rel=1e-3)
    # poly_iters = 0: the horizon is train.max_iters
    sets0 = sets[:-2] + ["optim.poly_iters=0", "train.max_iters=40000"]
    assert set_lr_at(sets0, its) == pytest.approx(
        [2.5e-4 * (1 - it / 40000) ** 0.9 for it in its], rel=1e-12)


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]


def test_freeze_bn_keeps_running_stats_and_normalises_as_in_eval_mode() -> None:
    model = tiny_model(freeze_bn=True)
    before = copy.deepcopy(model.state_dict())
    model.train()
    assert model.training and all(not m.training for m in bn_layers(model))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out_train = model(x)["logits"]
    out_train.square().mean().backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if "running_" in k or "num_batches_tracked" in k:
            assert torch.equal(after[k], v), f"{k} moved in a training step"
    # the train-mode forward is the eval-mode forward (the weights of before the step)
    ref = tiny_model(freeze_bn=True)
    ref.load_state_dict(before)
    assert torch.allclose(out_train, ref.eval()(x)["logits"], rtol=1e-5, atol=1e-6)
    # without the key the same forward normalises with the batch and moves the statistics
    free = tiny_model().train()
    free(x)
    assert not torch.equal(free.state_dict()["backbone.bn1.running_mean"],
                           before["backbone.bn1.running_mean"])


def test_freeze_bn_is_deeplabv2_only() -> None:
    with pytest.raises(ConfigError, match=r"model\.freeze_bn: True"):
        ModelConfig(name="daformer", freeze_bn=True)


def test_frozen_bn_stays_in_eval_mode_in_the_teacher_and_through_a_loop_step() -> None:
    """teacher_norm = "batch" turns the teacher's BN to train mode, except the layers
    model.freeze_bn freezes: the teacher normalises as the student does. A real loop step with
    SGD moves the weights but none of the frozen statistics."""
    cfg = load_config(REPO / "configs" / "demo.toml", [
        "model.freeze_bn=true", "model.freeze_bn_affine=true", "optim.name=sgd",
        "optim.lr=0.01", "optim.warmup_iters=0", "data.crop_size=[64, 64]",
        "self_training.teacher_norm=batch", "self_training.pseudo_threshold=0.01"])
    torch.manual_seed(0)
    model = build_network(cfg)
    methods = build_methods(cfg, model, torch.device("cpu"))
    t = SelfTraining(cfg, model, methods, torch.device("cpu"))
    assert isinstance(t.optimizer, torch.optim.SGD)
    assert all(not m.training for m in bn_layers(t.teacher))
    head_bn = [m for n, m in set_teacher_mode(t.teacher, "batch").named_modules()
               if isinstance(m, nn.BatchNorm2d) and not n.startswith("backbone.")]
    assert head_bn and all(m.training for m in head_bn)  # the projection head's BN: batch stats
    before_s = copy.deepcopy(t.student.state_dict())
    before_t = copy.deepcopy(t.teacher.state_dict())
    g = torch.Generator().manual_seed(5)
    src = {"image": torch.randn(2, 3, 64, 64, generator=g),
           "label": torch.randint(0, 4, (2, 64, 64), generator=g)}
    assert t.step(src, {"image": torch.randn(2, 3, 64, 64, generator=g)}, 0).finite
    for state, before in ((t.student.state_dict(), before_s), (t.teacher.state_dict(), before_t)):
        for k, v in before.items():
            if k.startswith("backbone.") and ("running_" in k or "num_batches" in k
                                              or k.endswith("bn1.weight")):
                assert torch.equal(state[k], v), k
    assert not torch.equal(t.student.state_dict()["backbone.conv1.weight"],
                           before_s["backbone.conv1.weight"])
