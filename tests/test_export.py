"""``python -m fastuda.export``: ONNX (run in onnxruntime) and TorchScript files that agree with
PyTorch on DeepLab-V2 and DAFormer, with only standard ONNX operators in the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastuda.config import load_config
from fastuda.export import main, onnx_custom_ops
from fastuda.models import build_network

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "deeplabv2": ["model.name='deeplabv2'", "model.backbone='resnet18'", "model.embed_dim=16"],
    "daformer": ["model.name='daformer'", "model.backbone='mit_b0'", "model.embed_dim=16",
                 "model.decoder_channels=32", "model.output_stride=0"],
}


def _checkpoint(tmp_path: Path, sets: list[str], config: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    cfg = load_config(config, sets)
    student, teacher = build_network(cfg).eval(), build_network(cfg).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"trainer": {"student": student.state_dict(), "teacher": teacher.state_dict()}},
               path)
    return (student, teacher), path


def _reference(model: torch.nn.Module, cfg_sets: list[str], image: torch.Tensor) -> torch.Tensor:
    """The PyTorch logits at the input size, normalised as the trainer does."""
    cfg = load_config(REPO / "configs" / "demo.toml", cfg_sets)
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model((image - mean) / std)["logits"]
    return F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.slow
# DeepLab-V2 dynamic, DAFormer at a fixed size: the dynamo exporter takes minutes over MiT's
# dynamic shapes on 2 CPU cores (about twice its fixed-size time)
@pytest.mark.parametrize(("name", "size"), [("deeplabv2", None), ("daformer", ["64", "96"])])
def test_onnx_agrees_with_pytorch(name: str, size: list[str] | None, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    config = REPO / "configs" / "demo.toml"
    sets = [*MODELS[name], "data.crop_size=[64, 64]"]
    (student, _), ckpt = _checkpoint(tmp_path, sets, config)
    out = tmp_path / "model.onnx"
    args = [str(config), "--checkpoint", str(ckpt), "--format", "onnx", "--output", str(out),
            *(x for s in sets for x in ("--set", s))]
    assert main([*args, *(["--size", *size] if size else [])]) == 0
    report = capsys.readouterr().out
    diff = float(report.split("max abs logit difference vs PyTorch: ")[1].split()[0])
    assert diff < 1e-3
    assert onnx_custom_ops(out) == []
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # fixed: the exported size; dynamic: another batch and an odd size than the traced ones
    shape = (1, 3, 64, 96) if size else (3, 3, 75, 133)
    image = torch.rand(*shape, generator=torch.Generator().manual_seed(3)) * 255
    got = session.run(["logits"], {"image": image.numpy()})[0]
    want = _reference(student, sets, image).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-3


@pytest.mark.parametrize("name", ["deeplabv2", "daformer"])
def test_torchscript_agrees_with_pytorch(name: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = REPO / "configs" / "demo.toml"
    sets = [*MODELS[name], "data.crop_size=[64, 64]"]
    (_, teacher), ckpt = _checkpoint(tmp_path, sets, config)
    out = tmp_path / "model.pt"
    assert main([str(config), "--checkpoint", str(ckpt), "--format", "torchscript", "--output",
                 str(out), "--weights", "teacher", *(x for s in sets for x in ("--set", s))]) == 0
    assert "exported teacher" in capsys.readouterr().out
    traced = torch.jit.load(str(out))
    image = torch.rand(2, 3, 72, 120, generator=torch.Generator().manual_seed(4)) * 255
    with torch.no_grad():
        got = traced(image)
    assert (got - _reference(teacher, sets, image)).abs().max() < 1e-3


def test_hrda_exports_its_single_scale_network(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = REPO / "configs" / "demo_cluda_hrda.toml"
    sets = ["model.backbone='resnet18'", "model.embed_dim=16", "data.crop_size=[64, 64]",
            "hrda.detail_crop=[32, 32]", "hrda.attention_channels=8"]
    (student, _), ckpt = _checkpoint(tmp_path, sets, config)
    out = tmp_path / "model.pt"
    assert main([str(config), "--checkpoint", str(ckpt), "--format", "torchscript", "--output",
                 str(out), *(x for s in sets for x in ("--set", s))]) == 0
    assert "single-scale network" in capsys.readouterr().out
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 255
    with torch.no_grad():
        got = torch.jit.load(str(out))(image)
    assert (got - _reference(student.model, sets, image)).abs().max() < 1e-3


def test_bad_checkpoint_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    config = REPO / "configs" / "demo.toml"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main([str(config), "--checkpoint", str(bad), "--format", "torchscript", "--output",
                 str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load checkpoint {bad}") and "Traceback" not in err
