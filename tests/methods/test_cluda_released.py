"""CLUDA's released multi-resolution loss (user0407/CLUDA bad6ed0,
mmseg/models/losses/contrastive_loss.py#L9-L99; mmseg/models/uda/dacs.py#L322-L343, #L413-L437;
mmseg/models/decode_heads/hrda_head.py#L198-L247) against a case worked out by hand and a naive
per-pair loop written here from the formula, plus the HRDA geometry of its inputs and the loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastuda.config import ConfigError, load_config
from fastuda.methods.cluda import released_multires_contrast
from fastuda.models import outputs as O

REPO = Path(__file__).resolve().parents[2]


def naive(fc: list[list[float]], fd: list[list[float]], y: list[int], a: list[float],
          m: list[float], q: list[float] | None, valid: list[bool], tau: float = 1.0) -> float:
    """The released per-anchor loss, one pair at a time, on flattened rows: fc[i], fd[j] the
    context / detail features of row i / j (same row order as y, a, m, q)."""
    n = len(y)

    def dot(u: list[float], v: list[float]) -> float:
        return sum(x * z for x, z in zip(u, v, strict=True)) / tau

    total, anchors = 0.0, 0
    for i in range(n):
        if not valid[i]:
            continue
        anchors += 1
        pos = [j for j in range(n) if j != i and valid[j] and y[j] == y[i]]
        neg = [k for k in range(n) if valid[k] and y[k] != y[i]]
        num = 0.0
        for j in pos:
            s, t = dot(fc[i], fc[j]), dot(fc[i], fd[j])
            cc = s - math.log(math.exp(s) + sum(math.exp(dot(fc[i], fc[k])) for k in neg))
            cd = t - math.log(math.exp(t) + sum(math.exp(dot(fc[i], fd[k])) for k in neg))
            w = a[i] * a[j] * m[i]
            qq = 1.0 if q is None else q[i] * q[j]
            num += qq * (w * cc + (1 - w) * cd)
        total += -num / max(len(pos), 1)
    return total / max(anchors, 1)


def grid_of(rows: list[list[float]], h: int, w: int) -> torch.Tensor:
    """[1, D, h, w] from h * w feature rows (row-major pixels)."""
    return torch.tensor(rows, dtype=torch.float64).T.reshape(1, -1, h, w)


# three pixels in a row: context features (1,0), (1,0), (0,1); the detail map is (1,0) at pixel 0
# (the box) and zero elsewhere (the pasted map); labels 0, 0, 1; a = 1, 0.5, 0.5; m = 1, 0, 0
FC = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
FD = [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
Y, A, M = [0, 0, 1], [1.0, 0.5, 0.5], [1.0, 0.0, 0.0]
L1E = math.log(1 + math.e)
# by hand: anchor 0 (positive 1, negative 2): w = a0 a1 m0 = 0.5,
#   cc = 1 - log(e + 1), cd = 0 - log(1 + 1)  ->  l0 = -(0.5 (1 - L1E) - 0.5 log 2)
# anchor 1 (positive 0, negative 2): m1 = 0, w = 0, cd = 1 - log(e + 1)  ->  l1 = L1E - 1
# anchor 2: no positive, counts 0; mean over the three anchors
HAND = (-(0.5 * (1 - L1E) - 0.5 * math.log(2)) + (L1E - 1)) / 3


def tensors(y: list[int] = Y, m: list[float] = M) -> tuple[torch.Tensor, ...]:
    n = len(y)
    return (grid_of(FC, 1, n), grid_of(FD, 1, n), torch.tensor([y]).reshape(1, 1, n),
            torch.tensor([A], dtype=torch.float64).reshape(1, 1, n),
            torch.tensor([m], dtype=torch.float64).reshape(1, 1, n))


def test_hand_computed_case() -> None:
    got = released_multires_contrast(*tensors())
    assert float(got) == pytest.approx(HAND, abs=1e-12)
    assert naive(FC, FD, Y, A, M, None, [True] * 3) == pytest.approx(HAND, abs=1e-12)


def test_ignore_pixels_are_no_pixels_unless_released() -> None:
    # a fourth pixel labelled 255 with the features of pixel 0: excluded by default, so the
    # hand value holds; released (255 a class of its own, contrastive_loss.py#L23): it is an
    # anchor of its own class (no positive, counts 0) and a negative of everyone else
    fc, fd, _, a, m = (grid_of(FC + [FC[0]], 1, 4), grid_of(FD + [FD[0]], 1, 4), None,
                       torch.tensor([A + [1.0]], dtype=torch.float64).reshape(1, 1, 4),
                       torch.tensor([M + [1.0]], dtype=torch.float64).reshape(1, 1, 4))
    y = torch.tensor([Y + [255]]).reshape(1, 1, 4)
    assert float(released_multires_contrast(fc, fd, y, a, m)) == pytest.approx(HAND, abs=1e-12)
    released = float(released_multires_contrast(fc, fd, y, a, m, ignore_as_class=True))
    expected = naive(FC + [FC[0]], FD + [FD[0]], Y + [255], A + [1.0], M + [1.0], None,
                     [True] * 4)
    assert released == pytest.approx(expected, abs=1e-12)
    assert abs(released - HAND) > 1e-3


def test_released_box_test_drops_road_anchors_from_the_box() -> None:
    """cluda.box_test = 'label_nonzero' (released: mix_mask = box_mask * label != 0,
    dacs.py#L330-L333, contrastive_loss.py#L76) makes m0 = 0 for the road anchor 0: its pair
    is context/detail only, l0 = log 2 (cd = -log 2) instead of the hand value's l0 (the method
    builds that m: test_released_inputs_paste_the_detail_map_into_zeros_at_the_box)."""
    got = released_multires_contrast(*tensors(m=[0.0, 0.0, 0.0]))
    assert float(got) == pytest.approx((math.log(2) + L1E - 1) / 3, abs=1e-12)


def _random_case(B: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    fc = F.normalize(torch.randn(B, 3, h, w, generator=g, dtype=torch.float64), dim=1)
    fd = F.normalize(torch.randn(B, 3, h, w, generator=g, dtype=torch.float64), dim=1)
    fd[:, :, :, : w // 2] = 0  # outside the box: the pasted map's zeros
    y = torch.randint(0, 2, (B, h, w), generator=g)
    y[0, 0, 0] = 255
    a = torch.rand(B, h, w, generator=g, dtype=torch.float64)
    m = (torch.arange(w) >= w // 2).to(torch.float64).expand(B, h, w).clone()
    q = torch.rand(B, h, w, generator=g, dtype=torch.float64)
    return fc, fd, y, a, m, q


def _rows(x: torch.Tensor, pixel_major: bool) -> list:
    """Flattened rows of [B, D, h, w] (or [B, h, w]) batch-major, or pixel-major as released."""
    v = x.flatten(2).transpose(1, 2) if x.dim() == 4 else x.flatten(1)[..., None]
    v = v.transpose(0, 1) if pixel_major else v
    v = v.reshape(-1, v.shape[-1])
    return v.tolist() if x.dim() == 4 else v[:, 0].tolist()


@pytest.mark.parametrize("pixel_major", [False, True])
@pytest.mark.parametrize("ignore_as_class", [False, True])
def test_two_by_two_grids_two_classes_against_the_naive_loop(pixel_major: bool,
                                                             ignore_as_class: bool) -> None:
    """Batch 2, 2x2 grids, 2 classes (and one 255 pixel), pseudo-weights: the naive loop pairs
    features and labels of the same pixel, or (released, contrastive_loss.py#L11 vs #L53) the
    pixel-major feature rows with the batch-major labels, weights and a, m."""
    fc, fd, y, a, m, q = _random_case(2, 2, 2, seed=3)
    got = released_multires_contrast(fc, fd, y, a, m, q, ignore_as_class=ignore_as_class,
                                     pixel_major_features=pixel_major)
    yl = _rows(y, False)
    valid = [True] * len(yl) if ignore_as_class else [v != 255 for v in yl]
    expected = naive(_rows(fc, pixel_major), _rows(fd, pixel_major), yl, _rows(a, False),
                     _rows(m, False), _rows(q, False), valid)
    assert float(got) == pytest.approx(expected, abs=1e-10)
    if pixel_major:  # the bug changes the value: the key restores a different loss
        fixed = released_multires_contrast(fc, fd, y, a, m, q, ignore_as_class=ignore_as_class)
        assert abs(float(fixed) - float(got)) > 1e-6


def test_chunks_give_the_same_value_and_gradients() -> None:
    """Anchors in chunks of 3 (recomputed in the backward) against one chunk: same loss, same
    gradients for the features and the pair-weight map; and the gradient of the features is the
    finite difference of the naive loop."""
    fc, fd, y, a, m, q = _random_case(2, 3, 4, seed=5)
    grads = []
    for chunk in (3, 10_000):
        leaves = [t.clone().requires_grad_(True) for t in (fc, fd, a)]
        loss = released_multires_contrast(leaves[0], leaves[1], y, leaves[2], m, q, chunk=chunk)
        loss.backward()
        grads.append((loss.item(), [t.grad.clone() for t in leaves]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-12)
    for g0, g1 in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.allclose(g0, g1, atol=1e-12)
    yl, ml, ql = _rows(y, False), _rows(m, False), _rows(q, False)
    valid = [v != 255 for v in yl]
    eps, (b, d, i, j) = 1e-6, (1, 2, 1, 3)
    plus, minus = fc.clone(), fc.clone()
    plus[b, d, i, j] += eps
    minus[b, d, i, j] -= eps
    numeric = (naive(_rows(plus, False), _rows(fd, False), yl, _rows(a, False), ml, ql, valid)
               - naive(_rows(minus, False), _rows(fd, False), yl, _rows(a, False), ml, ql,
                       valid)) / (2 * eps)
    assert float(grads[0][1][0][b, d, i, j]) == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def _tiny_cfg(extra: list[str] | None = None):  # noqa: ANN202
    return load_config(REPO / "configs" / "demo_cluda_hrda.toml", [
        "data.crop_size=[64, 64]", "hrda.detail_crop=[32, 32]", "hrda.attention_channels=8",
        "cluda.grid=[8, 8]", "cluda.head_channels=8", 'cluda.multires_loss="released"',
        *(extra or [])])


def test_released_inputs_paste_the_detail_map_into_zeros_at_the_box() -> None:
    """With the grid equal to the full grid (64 / stride 8 = 8x8; align_corners=True makes the
    resize the identity), the detail features are the detail view's map inside the box and zero
    vectors outside; the context features are the context map upsampled x2 (bilinear,
    align_corners=True); m is the box; a is the sigmoid of the head on the context head input."""
    from fastuda.methods import build_methods
    from fastuda.models import build_network

    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = build_network(cfg)
    cluda = build_methods(cfg, model, torch.device("cpu")).methods["cluda"]
    model.train()
    images = torch.randn(2, 3, 64, 64)
    out = model(images, box=(16, 48, 16, 48))  # on context cells (16 px)
    labels = torch.randint(0, 3, (2, 64, 64))
    f_c, f_d, lbl, a, m, q = cluda.released_inputs(out, labels, None)
    assert q is None and f_c.shape == f_d.shape == (2, out[O.FEATURES].shape[1], 8, 8)
    box = (slice(None), slice(None), slice(2, 6), slice(2, 6))  # 16..48 / 8
    assert torch.allclose(f_d[box], F.normalize(out[O.FEATURES_DETAIL].float(), dim=1),
                          atol=1e-5)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 2:6] = False
    assert f_d[:, :, outside].abs().max() == 0
    up = F.interpolate(out[O.FEATURES].float(), scale_factor=2, mode="bilinear",
                       align_corners=True)
    assert torch.allclose(f_c, F.normalize(up, dim=1), atol=1e-5)
    assert m[:, 2:6, 2:6].eq(1).all() and m.sum() == 2 * 16
    assert torch.equal(lbl, labels[:, ::8, ::8])  # nearest: the top-left pixel of each cell
    head = torch.sigmoid(cluda.weight_head(out[O.CONTEXT_HEAD_INPUT]))  # on the 4x4 context grid
    expected_a = F.interpolate(F.interpolate(head, scale_factor=2, mode="bilinear",
                                             align_corners=False), size=(8, 8),
                               mode="bilinear", align_corners=True)[:, 0]
    assert torch.allclose(a, expected_a, atol=1e-6)
    # released box test: road (class 0) in the box counts as outside
    cluda.settings.box_test = "label_nonzero"
    m0 = cluda.released_inputs(out, labels, None)[4]
    assert torch.equal(m0, m * (lbl != 0))


def test_the_loop_trains_the_released_pair_weight_head() -> None:
    """Two steps of the loop with the released loss: finite losses under the method's names,
    and the feat_weighter (a head of the decode head's type, one output) moves."""
    from fastuda.engine.self_training import SelfTraining
    from fastuda.methods import build_methods
    from fastuda.models import build_network
    from fastuda.models.heads import ASPPClassifier

    cfg = _tiny_cfg(["cluda.chunk=7"])
    torch.manual_seed(0)
    model = build_network(cfg)
    trainer = SelfTraining(cfg, model, build_methods(cfg, model, torch.device("cpu")),
                           torch.device("cpu"))
    head = trainer.methods.methods["cluda"].weight_head
    assert isinstance(head, ASPPClassifier)  # DeepLab-V2: the release's DLV2Head, 1 channel
    before = [p.detach().clone() for p in head.parameters()]
    g = torch.Generator().manual_seed(1)
    for it in range(2):
        src = {"image": torch.randn(2, 3, 64, 64, generator=g),
               "label": torch.randint(0, 4, (2, 64, 64), generator=g)}
        r = trainer.step(src, {"image": torch.randn(2, 3, 64, 64, generator=g)}, it)
        assert r.finite and math.isfinite(r.losses["cluda.src.contrast"])
        assert math.isfinite(r.losses["cluda.mix.contrast"])
    assert any(not torch.equal(p0, p) for p0, p in zip(before, head.parameters(), strict=True))


@pytest.mark.parametrize("key", ["cluda.ignore_as_class=true",
                                 "cluda.pixel_major_features=true",
                                 'cluda.box_test="label_nonzero"'])
def test_release_keys_need_the_released_loss_and_hrda(key: str) -> None:
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        load_config(REPO / "configs" / "demo_cluda_hrda.toml",
                    ['cluda.multires_loss="three_term"', key])
    with pytest.raises(ConfigError, match="hrda.enabled"):
        load_config(REPO / "configs" / "demo_cluda.toml", [key])
    load_config(REPO / "configs" / "demo_cluda_hrda.toml", ['cluda.multires_loss="released"', key])
