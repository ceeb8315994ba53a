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


class _FixedLogits(torch.nn.Module):
    """A stand-in network: the same stride-2 logits for any input (bilinear upsampling and the
    rescale to the label are then computed by hand)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.logits.expand(images.shape[0], -1, -1, -1)}


def test_whole_inference_rescales_the_logits_to_the_label_size() -> None:
    """mmseg whole inference with rescale (SePiCo encoder_decoder_projector.py#L247-L264, then
    softmax #L289): logits to the image size, bilinearly to the original label size, softmax."""
    import torch.nn.functional as F

    from fastuda.config import EvalConfig
    from fastuda.evaluate import predict

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 2, 4, generator=g)
    images = torch.zeros(1, 3, 4, 8)
    at_image = F.interpolate(logits, size=(4, 8), mode="bilinear", align_corners=False)
    expected = F.interpolate(at_image, size=(8, 16), mode="bilinear", align_corners=False)
    got = predict(_FixedLogits(logits), images, EvalConfig(mode="whole"), 3, (8, 16))
    assert torch.allclose(got, expected.softmax(1), atol=1e-6)
    # without a label size: the image's (the probabilities of the upsampled logits)
    assert torch.allclose(predict(_FixedLogits(logits), images, EvalConfig(mode="whole"), 3),
                          at_image.softmax(1), atol=1e-6)



def test_slide_inference_averages_the_windows_logits() -> None:
    """mmseg's slide inference (HRDA mmseg/models/segmentors/encoder_decoder.py#L201-L262, softmax
    after, #L318): overlapping windows' logits averaged, resized to the label, then softmax."""
    import torch.nn.functional as F

    from fastuda.config import EvalConfig
    from fastuda.evaluate import predict

    class Window(torch.nn.Module):  # logits that depend on the window: its mean colour per class
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": x[:, :1] * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
                    + x.mean((2, 3), keepdim=True)[:, :1]
                    * torch.tensor([3.0, 0.0, -3.0]).view(1, 3, 1, 1)}

    g = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, 4, 6, generator=g)
    # windows of width 4 at x = 0 and x = 2 (stride 2): columns 2-3 are covered twice
    left, right = (Window()(images[..., a:a + 4])["logits"] for a in (0, 2))
    scores = torch.zeros(1, 3, 4, 6)
    scores[..., :4] += left
    scores[..., 2:] += right
    scores[..., 2:4] /= 2
    expected = F.interpolate(scores, size=(8, 12), mode="bilinear", align_corners=False)
    got = predict(Window(), images, EvalConfig(mode="slide", crop_size=[4, 4], stride=[2, 2]), 3,
                  (8, 12))
    assert torch.allclose(got, expected.softmax(1), atol=1e-6)
    # the average of the probabilities would differ where the windows overlap
    probs = torch.zeros(1, 3, 4, 6)
    probs[..., :4] += left.softmax(1)
    probs[..., 2:] += right.softmax(1)
    probs[..., 2:4] /= 2
    assert not torch.allclose(predict(Window(), images, EvalConfig(
        mode="slide", crop_size=[4, 4], stride=[2, 2]), 3), probs, atol=1e-4)


def test_val_labels_original_keeps_the_label_files_size(tmp_path: Path) -> None:
    """data.val_labels = "original": the image resized to data.val.resize, the label as the file
    holds it (mmseg scores against the original annotation)."""
    from fastuda.config import DataConfig, DatasetConfig
    from fastuda.data import build_val_loader

    root = REPO / "data" / "synthetic"
    ensure_synthetic(str(root))
    val = DatasetConfig(name="synthetic_target", root=str(root), split="val", resize=[64, 32])
    batch = next(iter(build_val_loader(DataConfig(val=val, num_workers=0,
                                                  val_labels="original"))))
    file_label = np.array(Image.open(batch["meta"][0]["label_path"]))
    assert batch["image"].shape[-2:] == (32, 64)
    assert np.array_equal(batch["label"][0].numpy(), file_label)
    resized = next(iter(build_val_loader(DataConfig(val=val, num_workers=0))))
    assert resized["label"].shape[-2:] == (32, 64)


def test_evaluation_leaves_the_teachers_batch_norm_alone(tmp_path: Path) -> None:
    """The vis panel's teacher prediction runs in eval mode (the release's teacher normalises
    with batch statistics in training: validation images must not move its running
    statistics), and the teacher's modes are restored afterwards."""
    from fastuda.config import Config
    from fastuda.engine.self_training import set_teacher_mode
    from fastuda.evaluate import evaluate

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.bn(self.conv(x))}

    torch.manual_seed(0)
    teacher = set_teacher_mode(Net(), "batch")
    cfg = Config()
    cfg.model.num_classes = 3
    cfg.data.source.num_classes = 3
    batch = {"image": torch.randn(1, 3, 4, 4), "label": torch.zeros(1, 4, 4, dtype=torch.long)}
    evaluate(Net(), [batch], cfg, torch.device("cpu"), teacher=teacher,
             vis_path=tmp_path / "vis.png")
    assert (tmp_path / "vis.png").is_file()  # the teacher did predict
    assert teacher.bn.running_mean.tolist() == [0.0, 0.0, 0.0]
    assert teacher.bn.training and not teacher.training
