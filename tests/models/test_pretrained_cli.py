"""A bad ``model.pretrained`` file is a config error of ``python -m fastuda.train``: one
``error:`` line, exit status 2, before the work dir exists; evaluate/predict/export never read it
(the checkpoint they load sets every weight)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastuda.config import load_config
from fastuda.evaluate import load_model
from fastuda.models import PretrainedError, build_network, check_pretrained
from fastuda.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.toml"  # DeepLab-V2 / ResNet-18


def valid_file(tmp_path: Path) -> Path:
    """The demo model's backbone in fastuda's own layout (a loadable file)."""
    torch.manual_seed(0)
    net = build_network(load_config(DEMO))
    path = tmp_path / "good.pth"
    torch.save({k: v for k, v in net.state_dict().items() if k.startswith("backbone.")}, path)
    return path


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its error must carry)."""
    good = valid_file(tmp_path).read_bytes()
    files = {"missing": (tmp_path / "absent.pth", "not found")}
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"these bytes are no checkpoint")
    files["not a checkpoint"] = (junk, "cannot read")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good[: len(good) // 2])
    files["truncated"] = (cut, "cannot read")
    wrong = tmp_path / "wrong.pth"
    torch.save({"encoder.layer.0.weight": torch.zeros(2)}, wrong)
    files["wrong keys"] = (wrong, "match no known format")
    mit = tmp_path / "mit.pth"  # a released-MiT key layout: real format, wrong model
    torch.save({"patch_embed1.proj.weight": torch.zeros(32, 3, 7, 7)}, mit)
    files["another model's"] = (mit, "does not fit a DeepLabV2")
    return files


def test_bad_pretrained_files_are_one_error_line_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two cases as a real process (what a user sees, interpreter exit included), the others
    through the same ``main`` in this process (seconds instead of a process start each)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name, (path, phrase) in bad_files(tmp_path).items():
        work = tmp_path / f"work_{name.replace(' ', '_')}"
        args = [str(DEMO), "--work-dir", str(work), "--set", f"model.pretrained='{path}'"]
        if name in ("missing", "truncated"):
            proc = subprocess.run([sys.executable, "-m", "fastuda.train", *args],
                                  capture_output=True, text=True, env=env, cwd=tmp_path,
                                  timeout=300)
            code, err = proc.returncode, proc.stderr
        else:
            code, err = train_main(args), capsys.readouterr().err
        assert code == 2, (name, err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1, (name, err[-2000:])
        assert lines[0].startswith(f"error: model.pretrained = '{path}'"), (name, lines[0])
        assert phrase in lines[0], (name, lines[0])
        assert not work.exists(), name  # no work dir, no config.toml, no data generated


def test_check_pretrained_passes_a_good_file_and_names_the_key_of_a_bad_shape(
        tmp_path: Path) -> None:
    good = valid_file(tmp_path)
    check_pretrained(load_config(DEMO, [f"model.pretrained='{good}'"]).model)
    state = torch.load(good, weights_only=True)
    state["backbone.conv1.weight"] = torch.zeros(1, 3, 7, 7)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(PretrainedError, match=r"shape mismatch for 'backbone.conv1.weight'.*"
                                              r"checkpoint \(1, 3, 7, 7\), model \(64, 3, 7, 7\)"):
        check_pretrained(load_config(DEMO, [f"model.pretrained='{tmp_path / 'shape.pth'}'"]).model)


def test_evaluate_loads_the_checkpoint_without_reading_model_pretrained(tmp_path: Path) -> None:
    """evaluate, predict and export share ``load_model``: the training checkpoint holds every
    weight, so the pretrained file (here absent) is not read."""
    cfg = load_config(DEMO, [f"model.pretrained='{tmp_path / 'absent.pth'}'"])
    torch.manual_seed(1)
    student = build_network(load_config(DEMO))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"trainer": {"student": student.state_dict()}}, ckpt)
    model = load_model(cfg, ckpt, "student", torch.device("cpu"))
    for (name, want), got in zip(student.state_dict().items(), model.state_dict().values(),
                                 strict=True):
        assert torch.equal(want, got), name
