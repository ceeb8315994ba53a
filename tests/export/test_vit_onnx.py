"""ONNX export of a DINOv2 ViT (``python -m fastuda.export``'s code path) agrees with PyTorch in
onnxruntime, at the traced size and at another, odd size of a dynamic export (a graph that
fixed the traced size, as the exporter's fallback did before the ViT's padding lost its branch on
the size, fails there).

CI: a tiny-width ViT (timm's DINOv2 definition with 1 block of width 32: every operator of the
ViT graph, seconds). The real ViT-S/14 through the CLI is marked slow; ViT-B/14 was checked
once by hand (docs in README, "DINOv2 ViTs")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastuda.config import load_config
from fastuda.export import InferenceNet, example_input, export_onnx, main, onnx_custom_ops
from fastuda.models import build_network
from fastuda.models.vit import ViTSegModel

REPO = Path(__file__).resolve().parents[2]
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _ort():  # noqa: ANN202 - the optional module
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def test_tiny_vit_dynamic_onnx_agrees_at_other_sizes(tmp_path: Path) -> None:
    ort = _ort()
    torch.manual_seed(0)
    model = ViTSegModel("dinov2_vits14", num_classes=5, head="vfm_uda", projection=False,
                        timm_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}).eval()
    net = InferenceNet(model, MEAN, STD).eval()
    path = tmp_path / "vit.onnx"
    export_onnx(net, path, (56, 56), dynamic=True)  # traced at 4 x 4 patches
    assert onnx_custom_ops(path) == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # the traced size, sides padded to 14 (61 -> 70, 75 -> 84), another batch
    for i, shape in enumerate([(1, 3, 56, 56), (2, 3, 75, 61), (1, 3, 32, 100)]):
        image = example_input(shape[-2:], batch=shape[0], seed=10 + i)
        got = session.run(["logits"], {"image": image.numpy()})[0]
        with torch.no_grad():
            want = net(image).numpy()
        assert got.shape == want.shape == (shape[0], 5, *shape[-2:])
        assert np.abs(got - want).max() < 1e-3, shape


@pytest.mark.slow
def test_vit_s14_onnx_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """configs/demo_vit.toml (ViT-S/14, VFM-UDA head) exported at a fixed 56x56 input."""
    _ort()
    config = REPO / "configs" / "demo_vit.toml"
    sets = ["data.crop_size=[56, 56]"]
    torch.manual_seed(0)
    student = build_network(load_config(config, sets)).eval()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"trainer": {"student": student.state_dict()}}, ckpt)
    out = tmp_path / "vit_s.onnx"
    assert main([str(config), "--checkpoint", str(ckpt), "--format", "onnx", "--output", str(out),
                 "--size", "56", "56", "--set", sets[0]]) == 0
    report = capsys.readouterr().out
    diff = float(report.split("max abs logit difference vs PyTorch: ")[1].split()[0])
    assert diff < 1e-3
    assert onnx_custom_ops(out) == []
