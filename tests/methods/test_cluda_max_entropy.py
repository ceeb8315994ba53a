"""CLUDA's maximum-entropy detail box of the mixed pass (user0407/CLUDA bad6ed0:
mmseg/models/uda/dacs.py#L400-L407, mmseg/models/segmentors/hrda_encoder_decoder.py#L13-L28,
#L181-L213, #L310-L329, #L356-L358; mmseg/models/decode_heads/hrda_head.py#L117-L130,
#L213-L247, #L317-L320): hand-built entropy maps whose best window is known, the release's
aliasing bug on a case where it changes the answer, HRDA's forward with one box per image,
the switch at the start iteration in the loop, and an exact checkpoint round trip."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastuda.config import ConfigError, HRDAConfig, load_config
from fastuda.engine.self_training import SelfTraining, segmentation_losses
from fastuda.methods import build_methods
from fastuda.methods.cluda import multires_pair_contrast, to_grid
from fastuda.models import HRDAModel, build_network
from fastuda.models.base import SegModel
from fastuda.models.hrda import entropy_map, max_entropy_boxes

REPO = Path(__file__).resolve().parents[2]


def blocks(values: list[list[float]], size: int) -> Tensor:
    """A [1, 4 size, 4 size] map of constant size x size blocks."""
    v = torch.tensor(values, dtype=torch.float32)
    return v.repeat_interleave(size, 0).repeat_interleave(size, 1)[None]


# windows of 8 pixels at stride 4 on a 16x16 map: 3 x 3, each covering 2 x 2 blocks of 4
WINDOWS = [(y, y + 8, x, x + 8) for y in (0, 4, 8) for x in (0, 4, 8)]


def test_entropy_map_by_hand() -> None:
    logits = torch.zeros(1, 4, 1, 3)
    logits[0, :, 0, 1] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    logits[0, :, 0, 2] = torch.tensor([0.0, -math.inf, -math.inf, -math.inf])  # p = 1, 0, 0, 0
    ent = entropy_map(logits)[0, 0]
    assert float(ent[0]) == pytest.approx(math.log(4), rel=1e-6)  # uniform: log C
    # p = (e^2, 1, 1, 1) / (e^2 + 3)
    z = math.e ** 2 + 3
    p = [math.e ** 2 / z] + [1 / z] * 3
    assert float(ent[1]) == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-6)
    # a zero probability counts as 1e-8 (the release's get_entropy): 3 x 1e-8 x 18.42
    assert float(ent[2]) == pytest.approx(-3 * 1e-8 * math.log(1e-8), rel=1e-5)


def test_the_window_of_largest_mean_wins_and_ties_go_to_the_first() -> None:
    # image 0: a high block pair at rows 4..12, columns 8..16 -> window (4, 12, 8, 16) alone
    # holds all four of its blocks; image 1: only the top row of blocks is high, so the three
    # windows of the first row tie (mean 1/2) and the first, (0, 8, 0, 8), is kept
    e0 = blocks([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], 4)
    e1 = blocks([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], 4)
    ent = torch.cat([e0, e1])
    assert max_entropy_boxes(ent, WINDOWS) == [(4, 12, 8, 16), (0, 8, 0, 8)]
    assert max_entropy_boxes(ent, WINDOWS, overwrite=True) == [(4, 12, 8, 16), (0, 8, 0, 8)]


def test_the_released_overwrite_changes_the_answer_on_a_hand_case() -> None:
    """Blocks of 4 pixels (rows of blocks below); window (i, j) covers blocks i..i+1, j..j+1.
        0 0 0 4
        0 0 0 4
        5 0 0 0
        0 0 0 0
    True means: W(0,2) = (0 + 4 + 0 + 4) / 4 = 2 is the largest (W(1,0) = W(2,0) = 1.25,
    W(1,2) = 1, the others 0): the box (0, 8, 8, 16).
    The release (e_max a view of W(0,0)): W(0,2) > 0 writes its blocks over W(0,0), whose rows
    become 0 4 | 0 4; W(1,0) is then scored on blocks 0 4 / 5 0 = 9 / 4 = 2.25 > 2 and becomes the
    maximum, written over W(0,0) again (0 4 / 5 0, mean 2.25); no later window reaches 2.25
    (W(1,1): 0, W(1,2): 1, W(2,0): 1.25, W(2,1) = W(2,2) = 0): the box (4, 12, 0, 8)."""
    ent = blocks([[0, 0, 0, 4], [0, 0, 0, 4], [5, 0, 0, 0], [0, 0, 0, 0]], 4)
    assert max_entropy_boxes(ent, WINDOWS) == [(0, 8, 8, 16)]
    assert max_entropy_boxes(ent, WINDOWS, overwrite=True) == [(4, 12, 0, 8)]
    assert torch.equal(ent, blocks([[0, 0, 0, 4], [0, 0, 0, 4], [5, 0, 0, 0], [0, 0, 0, 0]], 4))


class Stub(SegModel):
    """Stride 2: logits = 1x1 conv of the 2x2-pooled image (no dropout, no norm: a second run of
    the head gives the same logits)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.decode_head = nn.Conv2d(3, num_classes, 1)
        self.output_stride, self.num_classes = 2, num_classes
        self.feature_channels, self.embed_dim = 3, 0

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        feats = F.avg_pool2d(images, 2)
        return {"logits": self.decode_head(feats), "features": feats}


def stub_hrda() -> HRDAModel:
    torch.manual_seed(0)
    cfg = HRDAConfig(enabled=True, context_scale=0.5, detail_crop=[8, 8], attention_channels=4,
                     crop_divisible=4)
    m = HRDAModel(Stub(), cfg, attention_head=nn.Conv2d(3, 3, 1))
    with torch.no_grad():  # logits = 40 x the pooled channels: class 0 where channel 0 is 1
        m.model.decode_head.weight.copy_(40 * torch.eye(3)[:, :, None, None])
        m.model.decode_head.bias.zero_()
    return m.train()


def up(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_hrda_takes_each_images_max_entropy_window_and_fuses_per_image() -> None:
    """16x16 crops: context view 8x8, context logits 4x4 (4 pixels each), detail windows 8 at
    stride 4. The image is (1, 0, 0) (one class, entropy ~0) except one 8x8 block of zeros
    (uniform logits: entropy log 3): image 0 at rows 4..12, columns 8..16, image 1 at 0..8,
    4..12; each image's box is its block, the fusion follows each image's box."""
    m = stub_hrda()
    x = torch.zeros(2, 3, 16, 16)
    x[:, 0] = 1
    x[0, :, 4:12, 8:16] = 0
    x[1, :, 0:8, 4:12] = 0
    x = x + 0.01 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(5)
    m.use_generator(g)
    state = g.get_state()
    out = m(x, box_rule="max_entropy")
    assert torch.equal(g.get_state(), state)  # nothing drawn
    assert out["detail_box"].tolist() == [[4, 12, 8, 16], [0, 8, 4, 12]]
    # the hand computation of the release's fusion with a list of boxes (hrda_head.py#L213-L247)
    ctx = m.model(up(x, (8, 8)))
    att_c = torch.sigmoid(m.attention_head(ctx["features"]))
    grid = (8, 8)
    mask = torch.zeros(2, 1, 4, 4)  # context cells: the box over align = 4
    mask[0, :, 1:3, 2:4] = 1
    mask[1, :, 0:2, 1:3] = 1
    att = up(att_c * mask, grid)
    placed = torch.zeros(2, 3, *grid)
    placed[0, :, 2:6, 4:8] = m.model(x[0:1, :, 4:12, 8:16])["logits"][0]
    placed[1, :, 0:4, 2:6] = m.model(x[1:2, :, 0:8, 4:12])["logits"][0]
    expected = att * placed + up((1 - att_c * mask) * ctx["logits"], grid)
    assert torch.allclose(out["logits"], expected, atol=1e-5)
    assert torch.allclose(out["attention_detail"][0], att[0, :, 2:6, 4:8])
    assert torch.allclose(out["attention_detail"][1], att[1, :, 0:4, 2:6])
    # the CE's labels and weights are cropped to each image's box
    label = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(2))
    weight = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(3))
    losses = segmentation_losses("mix", out, label, weight, detail_weight=0.1)
    crops = torch.stack([label[0, 4:12, 8:16], label[1, 0:8, 4:12]])
    wcrops = torch.stack([weight[0, 4:12, 8:16], weight[1, 0:8, 4:12]])
    ce = F.cross_entropy(up(out["logits_detail"], (8, 8)), crops, reduction="none")
    assert float(losses["mix.ce_detail"].detach()) == pytest.approx(
        0.1 * float((ce * wcrops).mean().detach()), rel=1e-5)
    # the random rule draws one box for the batch, as before
    assert m(x)["detail_box"].shape == (4,)


def test_explicit_boxes_are_checked_before_any_work() -> None:
    m = stub_hrda()
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="for a batch of 2"):
        m(x, box=[(0, 8, 0, 8)])
    with pytest.raises(ValueError, match="differ in size"):
        m(x, box=[(0, 8, 0, 8), (0, 4, 0, 8)])
    with pytest.raises(ValueError, match="box_rule"):
        m(x, box_rule="largest")


def make_trainer(*extra: str) -> SelfTraining:
    cfg = load_config(REPO / "configs" / "demo_cluda_hrda.toml", [
        "data.crop_size=[64, 64]", "hrda.detail_crop=[32, 32]", "hrda.attention_channels=8",
        "cluda.grid=[4, 4]", "cluda.head_channels=8", "model.num_classes=19",
        "self_training.pseudo_threshold=0.01", "cluda.mixed_detail_crop='max_entropy'",
        "cluda.max_entropy_start_iter=1", *extra])
    torch.manual_seed(0)
    model = build_network(cfg)
    method = build_methods(cfg, model, torch.device("cpu"))
    return SelfTraining(cfg, model, method, torch.device("cpu"))


def batches(it: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(100 + it)
    src = {"image": torch.randn(2, 3, 64, 64, generator=g),
           "label": torch.randint(0, 4, (2, 64, 64), generator=g)}
    return src, {"image": torch.randn(2, 3, 64, 64, generator=g)}


def record_forwards(trainer: SelfTraining) -> list[tuple[str | None, dict]]:
    calls: list[tuple[str | None, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict, out: dict) -> None:
        calls.append((kwargs.get("box_rule"), {k: v.detach() for k, v in out.items()
                                               if isinstance(v, Tensor)} | {"x": args[0]}))

    trainer.student.register_forward_hook(hook, with_kwargs=True)
    return calls


def naive_max_entropy_box(logits: Tensor, size: tuple[int, int], crop: int, stride: int
                          ) -> tuple[int, int, int, int]:
    """The window (raster order, first of the largest) of the crop's largest mean entropy, the
    entropy -sum p log p of the context logits upsampled (nearest) to the crop, one pixel at a
    time."""
    p = torch.softmax(logits.double(), 0)
    ent = -(p * p.log()).sum(0)
    H, W = size
    sy, sx = H // ent.shape[0], W // ent.shape[1]
    best, best_mean = None, -1.0
    for y1 in range(0, H - crop + 1, stride):
        for x1 in range(0, W - crop + 1, stride):
            total = sum(float(ent[y // sy, x // sx]) for y in range(y1, y1 + crop)
                        for x in range(x1, x1 + crop))
            if total / crop ** 2 > best_mean + 1e-12:
                best, best_mean = (y1, y1 + crop, x1, x1 + crop), total / crop ** 2
    return best  # type: ignore[return-value]


def test_the_mixed_pass_switches_to_max_entropy_at_the_start_iteration() -> None:
    t = make_trainer()
    assert [p.box_rule for p in t.passes(0)] == [None, None]
    assert [p.box_rule for p in t.passes(1)] == [None, "max_entropy"]
    calls = record_forwards(t)
    assert t.step(*batches(0), 0).finite and t.step(*batches(1), 1).finite
    rules = [rule for rule, _ in calls]
    assert rules == [None, None, None, "max_entropy"]  # src, mix at 0; src, mix at 1
    for _, out in calls[:3]:
        assert out["detail_box"].shape == (4,)  # HRDA's one random box per batch
    out = calls[3][1]
    # the demo's DeepLab-V2 head has no dropout or norm: the release's second head run gives
    # exactly the context logits of the pass
    want = [naive_max_entropy_box(lg, (64, 64), 32, 16) for lg in out["logits_context"]]
    assert [tuple(b) for b in out["detail_box"].tolist()] == want


def test_random_keeps_hrdas_box_and_the_keys_are_checked() -> None:
    t = make_trainer("cluda.mixed_detail_crop='random'")
    assert [p.box_rule for p in t.passes(10 ** 6)] == [None, None]
    t = make_trainer("cluda.max_entropy_overwrite=true")
    assert t.passes(1)[-1].box_rule == "max_entropy_overwrite"
    demo = REPO / "configs" / "demo_cluda_hrda.toml"
    assert load_config(demo).settings("cluda").mixed_detail_crop == "random"
    with pytest.raises(ConfigError, match="cluda.mixed_detail_crop"):
        load_config(demo, ["cluda.mixed_detail_crop='largest'"])
    with pytest.raises(ConfigError, match="cluda.max_entropy_start_iter"):
        load_config(demo, ["cluda.max_entropy_start_iter=-1"])
    with pytest.raises(ConfigError, match="cluda.max_entropy_overwrite"):
        load_config(demo, ["cluda.max_entropy_overwrite=true"])  # with "random"
    with pytest.raises(ConfigError, match="cluda.max_entropy_overwrite"):
        load_config(REPO / "configs" / "demo_cluda.toml",
                    ["cluda.max_entropy_overwrite=true"])  # no HRDA


def test_checkpoint_round_trip_is_exact_across_the_switch() -> None:
    a = make_trainer()
    a.step(*batches(0), 0)
    state = copy.deepcopy(a.state_dict())
    calls_a = record_forwards(a)
    ra = a.step(*batches(1), 1)
    b = make_trainer()
    b.load_state_dict(state)
    calls_b = record_forwards(b)
    rb = b.step(*batches(1), 1)
    assert ra.finite and rb.finite and ra.losses == rb.losses
    assert torch.equal(calls_a[-1][1]["detail_box"], calls_b[-1][1]["detail_box"])
    assert calls_a[-1][1]["detail_box"].shape == (2, 4)
    for (k, pa), pb in zip(a.student.state_dict().items(), b.student.state_dict().values(),
                           strict=True):
        assert torch.equal(pa, pb), k


def test_the_contrasts_follow_each_images_box() -> None:
    """The released loss's inputs with one box per image (hrda_head.py#L213-L221, #L240-L247
    with a list of boxes): each image's detail map is pasted at its own box (stride 8 on the
    8x8 full grid, where align_corners=True makes the grid resize the identity), m is its own
    box; the former three-term loss crops each image's labels to its box."""
    from fastuda.models import outputs as O

    cfg = load_config(REPO / "configs" / "demo_cluda_hrda.toml", [
        "data.crop_size=[64, 64]", "hrda.detail_crop=[32, 32]", "hrda.attention_channels=8",
        "cluda.grid=[8, 8]", "cluda.head_channels=8", 'cluda.multires_loss="released"'])
    torch.manual_seed(0)
    model = build_network(cfg).train()
    cluda = build_methods(cfg, model, torch.device("cpu"))["cluda"]
    images = torch.randn(2, 3, 64, 64)
    boxes = [(16, 48, 16, 48), (0, 32, 32, 64)]
    out = model(images, box=boxes)
    assert out[O.DETAIL_BOX].tolist() == [list(b) for b in boxes]
    labels = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(4))
    f_c, f_d, lbl, a, m, q = cluda.released_inputs(out, labels, None)
    detail = F.normalize(out[O.FEATURES_DETAIL].float(), dim=1)
    for b, (y1, y2, x1, x2) in enumerate(boxes):
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[y1 // 8:y2 // 8, x1 // 8:x2 // 8] = True
        assert torch.allclose(f_d[b][:, inside], detail[b].flatten(1), atol=1e-5)
        assert f_d[b][:, ~inside].abs().max() == 0
        assert torch.equal(m[b], inside.float())
    # three-term: the same loss as from each image's labels cropped by hand, stacked
    three = load_config(REPO / "configs" / "demo_cluda_hrda.toml", [
        "data.crop_size=[64, 64]", "hrda.detail_crop=[32, 32]", "hrda.attention_channels=8",
        "cluda.grid=[8, 8]", "cluda.head_channels=8"])
    cluda3 = build_methods(three, model, torch.device("cpu"))["cluda"]
    crops = torch.stack([labels[0, 16:48, 16:48], labels[1, 0:32, 32:64]])
    f_cg, l_cg, _ = to_grid(out[O.FEATURES], labels, None, cluda3.grid)
    f_dg, l_dg, _ = to_grid(out[O.FEATURES_DETAIL], crops, None, cluda3.grid)
    a_c, a_d = cluda3.pair_weight(out[O.FEATURES]), cluda3.pair_weight(out[O.FEATURES_DETAIL])
    want = multires_pair_contrast(
        torch.cat([f_cg, f_dg]), torch.cat([l_cg, l_dg]), torch.cat([a_c, a_d]),
        torch.cat([torch.ones_like(a_c), -torch.ones_like(a_d)]), None,
        tau=three.settings("cluda").tau, ignore_index=255, backend=cluda3.backend)
    assert float(cluda3.contrast_multires(out, labels).detach()) == pytest.approx(
        float(want.detach()), rel=1e-6)
