"""DAFormer's ImageNet feature distance (fastuda/methods/fdist.py) against hand-built
computations: the label rule (downscale_label_ratio), the masked mean of the channel L2 distance,
the frozen model (same file as the student, no gradient, unchanged by training, not in
checkpoints, rebuilt on resume), HRDA's context view, the config, and the presets that switch it
on (released values: lhoyer/DAFormer configs/daformer/
gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py#L26-L28)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastuda.config import ConfigError, load_config
from fastuda.engine.context import MethodContext, StepView
from fastuda.engine.self_training import SelfTraining
from fastuda.methods import build_methods
from fastuda.methods.fdist import (
    THING_CLASSES,
    FDist,
    FDistSettings,
    feature_distance_mask,
    masked_feature_distance,
)
from fastuda.models import build_model, build_network

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


# ----------------------------------------------------------------------------------------------
# The label rule and the distance, by hand
# ----------------------------------------------------------------------------------------------
def test_mask_follows_downscale_label_ratio_by_hand() -> None:
    # four 4x4 cells: pure 6 (thing); 12/16 of 7 (= 0.75, kept); 11/16 of 11 (< 0.75: ignore);
    # pure road 0 (stuff); and a second image whose cell is mostly 255 (ignore wins)
    lbl = torch.zeros(2, 8, 8, dtype=torch.long)
    lbl[0, :4, :4] = 6
    lbl[0, :4, 4:] = 7
    lbl[0, 0, 4:8] = 1  # 4 of 16 pixels of cell (0, 1) are not 7
    lbl[0, 4:, :4] = 11
    lbl[0, 4, :4] = 2
    lbl[0, 5, 0] = 2  # 5 of 16 pixels of cell (1, 0) are not 11
    lbl[1] = 13
    lbl[1, :3, :4] = 255  # 12 of 16 ignored: cell (0, 0) of image 1 is ignore
    lbl[1, 4:, 4:] = 8  # stuff
    mask = feature_distance_mask(lbl, (2, 2), THING_CLASSES, num_classes=19, min_ratio=0.75,
                                 ignore_index=255, backend="torch")
    assert mask.tolist() == [[[True, True], [False, False]], [[False, True], [True, False]]]
    # classes = [] (the release's classes None): every cell that is not ignore
    every = feature_distance_mask(lbl, (2, 2), [], num_classes=19, min_ratio=0.75,
                                  ignore_index=255, backend="torch")
    assert every.tolist() == [[[True, True], [False, True]], [[False, True], [True, True]]]
    # the factor is W // w as released: a 9x9 label on a 2x2 grid drops its last row/column
    big = F.pad(lbl, (0, 1, 0, 1), value=0)
    assert torch.equal(feature_distance_mask(big, (2, 2), THING_CLASSES, num_classes=19,
                                             min_ratio=0.75, ignore_index=255,
                                             backend="torch"), mask)


def test_masked_feature_distance_by_hand() -> None:
    f1 = torch.zeros(1, 2, 2, 2, requires_grad=True)
    f2 = torch.tensor([[[[3.0, 0.0], [6.0, 0.0]], [[4.0, 1.0], [8.0, 0.0]]]])
    # per cell L2 distances: (3, 4) -> 5, (0, 1) -> 1, (6, 8) -> 10, (0, 0) -> 0
    mask = torch.tensor([[[True, False], [True, False]]])
    d = masked_feature_distance(f1, f2, mask)
    assert float(d.detach()) == pytest.approx((5 + 10) / 2)
    d.backward()
    # d/df1 of |f1 - f2| at the masked cells, over 2 cells: (f1 - f2) / |f1 - f2| / 2
    expect = torch.zeros(1, 2, 2, 2)
    expect[0, :, 0, 0] = torch.tensor([-3.0, -4.0]) / 5 / 2
    expect[0, :, 1, 0] = torch.tensor([-6.0, -8.0]) / 10 / 2
    assert torch.allclose(f1.grad, expect)
    # no thing pixel: 0 with a zero gradient (the release's NaN mean has a zero gradient too)
    f1.grad = None
    empty = masked_feature_distance(f1, f2, torch.zeros(1, 2, 2, dtype=torch.bool))
    assert float(empty.detach()) == 0.0
    empty.backward()
    assert torch.count_nonzero(f1.grad) == 0


# ----------------------------------------------------------------------------------------------
# In the loop: the frozen ImageNet model
# ----------------------------------------------------------------------------------------------
def write_pretrained(path: Path, seed: int) -> Path:
    """A torchvision-layout ResNet-18 file (what model.pretrained names for DeepLab-V2)."""
    torch.manual_seed(seed)
    cfg = load_config(CONFIGS / "demo_daformer.toml")
    model = build_model(cfg.model)
    state = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()
             if k.startswith("backbone.")}
    for k in state:  # BN statistics that are not the fresh 0/1
        if k.endswith("running_mean"):
            state[k] = torch.randn_like(state[k]) * 0.1
    torch.save(state, path)
    return path


def make_trainer(pretrained: Path, extra: list[str] | None = None) -> SelfTraining:
    cfg = load_config(CONFIGS / "demo_daformer.toml",
                      ['methods=["fdist"]', f'model.pretrained="{pretrained}"',
                       "data.crop_size=[64, 64]", "model.output_stride=8",  # batches' grid
                       *(extra or [])])
    torch.manual_seed(0)
    model = build_network(cfg)
    methods = build_methods(cfg, model, torch.device("cpu"))
    return SelfTraining(cfg, model, methods, torch.device("cpu"))


def batches(it: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(100 + it)
    # labels constant on the 8x8 cells of the stride-8 grid, so the mask is the cell's class
    cells = torch.randint(0, 19, (2, 8, 8), generator=g)
    label = cells.repeat_interleave(8, 1).repeat_interleave(8, 2)
    return ({"image": torch.randn(2, 3, 64, 64, generator=g), "label": label},
            {"image": torch.randn(2, 3, 64, 64, generator=g)})


def test_loss_frozen_model_and_resume(tmp_path: Path) -> None:
    path = write_pretrained(tmp_path / "imnet.pth", seed=1)
    a = make_trainer(path)
    fd = a.methods["fdist"]
    file = torch.load(path, weights_only=True)
    frozen = fd.imnet_model
    # the frozen copy is the file's weights, like the student's start
    for k, v in file.items():
        assert torch.equal(frozen.state_dict()["backbone." + k], v), k
        assert torch.equal(a.student.state_dict()["backbone." + k], v), k
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    in_optim = {id(p) for g in a.optimizer.param_groups for p in g["params"]}
    assert not {id(p) for p in frozen.parameters()} & in_optim
    # checkpoints hold the fingerprint only, never the frozen weights
    assert set(a.methods.state_dict()) == {"methods.fdist.fingerprint"}

    # the expected loss, by hand: the student's last stage (train mode, as in its source pass)
    # and the frozen model's (eval mode) on the clean source image, masked mean over the cells
    # whose class is a thing class
    src, tgt = batches(0)
    student = copy.deepcopy(a.student).train()
    with torch.no_grad():
        fs = student.backbone(src["image"])[-1]
        fi = frozen.backbone(src["image"])[-1]
    cells = src["label"][:, ::8, ::8]
    thing = torch.isin(cells, torch.tensor(THING_CLASSES))
    dist = (fs - fi).pow(2).sum(1).sqrt()
    expect = 0.005 * float(dist[thing].mean())
    frozen_before = copy.deepcopy(frozen.state_dict())
    ra = a.step(src, tgt, 0)
    assert ra.finite
    assert ra.losses["fdist.src.feat_dist"] == pytest.approx(expect, rel=1e-5)
    assert expect > 0
    # training changes neither the frozen weights nor its BN statistics, and gives it no grads
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, frozen_before[k]), k
    assert all(p.grad is None for p in frozen.parameters())

    # resume: a fresh trainer rebuilt from the same file continues exactly
    state = copy.deepcopy(a.state_dict())
    rb_ref = a.step(*batches(1), 1)
    b = make_trainer(path)
    b.load_state_dict(state)
    rb = b.step(*batches(1), 1)
    assert rb.losses == rb_ref.losses
    # another pretrained file does not match the checkpoint's frozen model: an error
    other = make_trainer(write_pretrained(tmp_path / "other.pth", seed=2))
    with pytest.raises(ValueError, match="model.pretrained"):
        other.load_state_dict(state)


def test_student_gets_the_gradient_of_the_distance(tmp_path: Path) -> None:
    path = write_pretrained(tmp_path / "imnet.pth", seed=1)
    fd = make_trainer(path).methods["fdist"]
    student = build_model(load_config(CONFIGS / "demo_daformer.toml",
                                      [f'model.pretrained="{path}"',
                                       "model.output_stride=8"]).model)
    src, _ = batches(0)
    fd.start_step(StepView(0, src, {}, source_image=src["image"], source_label=src["label"]))
    out = student(src["image"])
    loss = fd.source_losses(out, src["label"], 0)["src.feat_dist"]
    loss.backward()
    assert student.backbone.layer4[-1].conv2.weight.grad.abs().sum() > 0
    assert student.decode_head.parameters().__next__().grad is None  # heads are not in it


def test_hrda_compares_the_context_view(tmp_path: Path) -> None:
    path = write_pretrained(tmp_path / "imnet.pth", seed=1)
    t = make_trainer(path, ["hrda.enabled=true", "hrda.detail_crop=[32, 32]",
                            "hrda.attention_channels=8"])
    fd = t.methods["fdist"]
    assert fd.ctx.context_scale == 0.5
    img = torch.randn(2, 3, 64, 64)
    half = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(fd.imnet_features(img), fd.imnet_model.backbone_output(half))
    assert t.step(*batches(0), 0).finite  # the student's context backbone: the same 4x4 grid


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def test_config_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[self_training]\nimnet_feature_dist = 0.005\n")
    with pytest.raises(ConfigError, match="self_training.imnet_feature_dist.*fdist"):
        load_config(p)
    for text, needle in [('methods = ["fdist"]\n[fdist]\nweight = 0.0\n', "fdist.weight"),
                         ('methods = ["fdist"]\n[fdist]\nclasses = [6, 19]\n', "fdist.classes"),
                         ('methods = ["fdist"]\n[fdist]\nscale_min_ratio = 0.0\n',
                          "fdist.scale_min_ratio"),
                         ('methods = ["fdist"]\n[fdist]\nlambda = 0.1\n', "'lambda'"),
                         ('methods = ["sepico", "fdist"]\n', "strong-augment")]:
        p.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            load_config(p)
    cfg = load_config(CONFIGS / "demo_daformer.toml", ['methods=["fdist"]'])
    with pytest.raises(ValueError, match="model.pretrained"):
        FDist(FDistSettings(), MethodContext.from_config(cfg, None, torch.device("cpu")))


# the presets whose release trains with the feature distance ('dacs_a999_fdthings' /
# the DAFormer config #L26-L28; HRDA config #L14; MIC seg/configs/mic/gtaHR2csHR_mic_hrda.py#L13;
# CLUDA configs/hrda/gtaHR2csHR_hrda.py#L9), and those whose release does not (SePiCo's UDA
# config has no imnet_feature_dist key: BIT-DA/SePiCo configs/_base_/uda/sepico.py#L7-L21)
FD_PRESETS = ["baselines/daformer_gta2cs", "cluda/daformer_gta2cs", "cluda/daformer_synthia2cs",
              "cluda/hrda_daformer_gta2cs", "cluda/hrda_daformer_synthia2cs",
              "mic/daformer_gta2cs", "mic/hrda_daformer_gta2cs", "mic/hrda_daformer_synthia2cs"]


@pytest.mark.parametrize("name", FD_PRESETS)
def test_presets_with_the_released_feature_distance(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert "fdist" in cfg.methods
    s = cfg.settings("fdist")
    assert s.weight == 0.005  # imnet_feature_dist_lambda
    assert s.classes == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]  # imnet_feature_dist_classes
    assert s.scale_min_ratio == 0.75  # imnet_feature_dist_scale_min_ratio


@pytest.mark.parametrize("path", sorted((CONFIGS / "sepico").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_sepico_presets_have_no_feature_distance(path: Path) -> None:
    assert "fdist" not in load_config(path).methods
