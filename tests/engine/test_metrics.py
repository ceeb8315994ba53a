"""mIoU accumulated over a split, checked against cityscapesscripts' own evaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastuda.engine.metrics import ConfusionMatrix

TRAIN_TO_ID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def test_hand_computed_case() -> None:
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    iou = cm.iou()
    # class 0: tp 1, fn 1, fp 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(iou[3])  # never in ground truth nor prediction: left out of the mean
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_accumulates_over_the_split_not_per_image() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))
    cm.update(torch.tensor([1]), torch.tensor([1]))
    # totals: class 0 tp 3 fp 1 -> 3/4; class 1 tp 1 fn 1 -> 1/2 (per-image averaging differs)
    assert cm.iou().tolist() == pytest.approx([0.75, 0.5])


def test_out_of_range_label_is_an_error() -> None:
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(3).update(torch.tensor([0, 1]), torch.tensor([0, 7]))


def test_matches_cityscapesscripts(tmp_path) -> None:
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    gen = torch.Generator().manual_seed(0)
    args = ev.args
    args.evalInstLevelScore = False
    args.quiet = True
    conf = ev.generateMatrix(args)
    inst = ev.generateInstanceStats(args)
    ours = ConfusionMatrix(19)
    lut = np.array(TRAIN_TO_ID + [0] * (256 - 19), dtype=np.uint8)
    lut[255] = 0  # Cityscapes "unlabeled" (ignored in evaluation)
    for i in range(4):
        # skewed random maps so some classes are rare or absent
        gt = torch.randint(0, 12, (37, 53), generator=gen)
        gt[torch.rand(37, 53, generator=gen) < 0.15] = 255
        pred = torch.where(torch.rand(37, 53, generator=gen) < 0.6, gt.clamp_max(18),
                           torch.randint(0, 19, (37, 53), generator=gen))
        pred[pred == 255] = 0
        ours.update(pred, gt)
        pgt, ppred = tmp_path / f"{i}_gtFine_labelIds.png", tmp_path / f"{i}_pred.png"
        Image.fromarray(lut[gt.numpy().astype(np.uint8)]).save(pgt)
        Image.fromarray(lut[pred.numpy().astype(np.uint8)]).save(ppred)
        ev.evaluatePair(str(ppred), str(pgt), conf, inst, {}, args)
    scores = {ev.id2label[lid].name: ev.getIouScoreForLabel(lid, conf, args)
              for lid in TRAIN_TO_ID}
    theirs = ev.getScoreAverage(scores, args)
    assert ours.miou() == pytest.approx(theirs, abs=1e-12)
    mine = ours.iou().tolist()
    for train_id, lid in enumerate(TRAIN_TO_ID):
        a, b = mine[train_id], scores[ev.id2label[lid].name]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def test_synthia_subsets_by_hand() -> None:
    from fastuda.data.classes import SYNTHIA13, SYNTHIA16
    assert len(SYNTHIA16) == 16 and len(SYNTHIA13) == 13
    assert not {3, 4, 5} & set(SYNTHIA13)  # wall, fence, pole
    cm = ConfusionMatrix(19)
    gen = torch.Generator().manual_seed(1)
    gt = torch.tensor(SYNTHIA16)[torch.randint(0, 16, (4000,), generator=gen)]
    pred = torch.where(torch.rand(4000, generator=gen) < 0.7, gt, torch.randint(0, 19, (4000,),
                       generator=gen))
    cm.update(pred, gt)
    iou = cm.iou()
    rec = cm.summary([str(i) for i in range(19)], {"mIoU16": SYNTHIA16, "mIoU13": SYNTHIA13})
    assert rec["mIoU16"] == pytest.approx(100 * float(iou[list(SYNTHIA16)].mean()), abs=1e-3)
    assert rec["mIoU13"] == pytest.approx(100 * float(iou[list(SYNTHIA13)].mean()), abs=1e-3)


def _hand_case() -> ConfusionMatrix:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]]), torch.tensor([[0, 0, 1, 1],
                                                                        [2, 2, 255, 255]]))
    return cm


def test_confusion_matrix_and_class_table_by_hand() -> None:
    from fastuda.engine.metrics import class_table, confusion_record, row_normalised

    cm = _hand_case()
    # rows ground truth, columns prediction; the two ignored pixels are not counted
    expected = [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert cm.matrix.tolist() == expected
    norm = row_normalised(cm)
    assert norm[:3].tolist() == [[0.5, 0.5, 0, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0]]
    assert torch.isnan(norm[3]).all()  # class 3 has no labelled pixel
    rows = class_table(cm, ["a", "b", "c", "d"])
    # column sums (predicted) 2, 3, 1, 0; row sums (labelled) 2, 2, 2, 0; 6 pixels
    want = {"a": (100 / 3, 50, 50, 100 / 3, 100 / 3), "b": (200 / 3, 200 / 3, 100, 100 / 3, 50),
            "c": (50, 100, 50, 100 / 3, 100 / 6)}
    for row in rows[:3]:
        got = (row["IoU"], row["precision"], row["recall"], row["pixel_share"],
               row["predicted_share"])
        assert got == pytest.approx(want[row["class"]], abs=1e-4), row
    assert rows[3] == {"class": "d", "IoU": None, "precision": None, "recall": None,
                       "pixel_share": 0.0, "predicted_share": 0.0}
    rec = confusion_record(cm, ["a", "b", "c", "d"])
    assert rec["counts"] == expected and rec["classes"] == ["a", "b", "c", "d"]
    assert rec["row_normalised"][3] == [None] * 4 and rec["row_normalised"][0][:2] == [0.5, 0.5]


def test_confusion_heat_map(tmp_path) -> None:
    from fastuda.engine.metrics import row_normalised
    from fastuda.engine.vis import save_confusion_png

    save_confusion_png(row_normalised(_hand_case()), ["road", "b", "c", "d"], tmp_path / "m.png")
    im = np.array(Image.open(tmp_path / "m.png").convert("RGB"))
    colours = {tuple(c) for c in im.reshape(-1, 3).tolist()}
    assert (8, 48, 107) in colours  # the full cell (b -> b: 100 %)
    assert (200, 200, 200) in colours  # the row of class d, which has no labelled pixel
    assert (132, 152, 181) in colours  # a 50 % cell, halfway from white to the full colour
