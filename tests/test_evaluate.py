"""``python -m fastuda.evaluate`` writes the confusion matrix (JSON, heat map) and the per-class
table; their numbers are checked against the label files themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastuda.config import load_config
from fastuda.data import ensure_synthetic
from fastuda.evaluate import default_output, main
from fastuda.models import build_network

REPO = Path(__file__).resolve().parents[1]


def test_evaluate_writes_confusion_and_class_table(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = REPO / "data" / "synthetic"
    ensure_synthetic(str(root))
    config = REPO / "configs" / "demo.toml"
    n = 2
    sets = ["model.embed_dim=16", "data.num_workers=0", "train.device='cpu'",
            f"data.val.root={str(root)!r}", f"eval.max_images={n}"]
    torch.manual_seed(0)
    ckpt = tmp_path / "run" / "checkpoints" / "iter_5.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(build_network(load_config(config, sets)).state_dict(), ckpt)
    assert default_output(ckpt) == tmp_path / "run" / "eval" / "iter_5"
    assert main([str(config), "--checkpoint", str(ckpt), *(x for s in sets for x in ("--set", s))
                 ]) == 0
    out = capsys.readouterr().out
    record = json.loads(out.strip().splitlines()[-1])
    assert "| class | IoU | precision | recall | pixel share | predicted share |" in out
    folder = tmp_path / "run" / "eval" / "iter_5"
    conf = json.loads((folder / "confusion.json").read_text())
    counts = np.array(conf["counts"])
    assert counts.shape == (19, 19) and conf["classes"][0] == "road"
    # the rows are the labelled pixels of each class in the first n val label files
    labels = sorted((root / "target" / "gtFine" / "val").glob("*/*_labelTrainIds.png"))[:n]
    per_class = sum(np.bincount(np.array(Image.open(p)).ravel(), minlength=256)
                    for p in labels)
    assert (counts.sum(1) == per_class[:19]).all()
    # the IoU the record reports is TP / (row + column - TP) of these counts
    tp = np.diag(counts)
    union = counts.sum(0) + counts.sum(1) - tp
    table = json.loads((folder / "record.json").read_text())["per_class"]
    for c, row in enumerate(table):
        if union[c]:
            assert row["IoU"] == pytest.approx(100 * tp[c] / union[c], abs=1e-3)
            assert record["IoU"][row["class"]] == row["IoU"]
        if counts[:, c].sum():
            assert row["precision"] == pytest.approx(100 * tp[c] / counts[:, c].sum(), abs=1e-3)
        if counts[c].sum():
            assert row["recall"] == pytest.approx(100 * tp[c] / counts[c].sum(), abs=1e-3)
            norm = conf["row_normalised"][c]
            assert norm == pytest.approx((counts[c] / counts[c].sum()).tolist(), abs=1e-6)
        assert row["pixel_share"] == pytest.approx(100 * counts[c].sum() / counts.sum(),
                                                   abs=1e-3)
    assert Image.open(folder / "confusion.png").size[0] > 19 * 20
    assert (folder / "per_class.md").read_text().startswith("| class |")
