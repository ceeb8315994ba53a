"""``ops.backend = "triton"`` trains: the ops with a Triton kernel run it, the others (class_stats,
downscale_labels) run the next backend that can serve the tensor (issue 17; before, class_stats
refused "triton" and training failed at the first step).

On CPU the Triton kernels run in Triton's interpreter, which must be on before triton is first
imported: the training step runs in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastuda.ops import _op, class_stats, downscale_labels

REPO = Path(__file__).resolve().parents[2]

_TRAIN_ONE_STEP = """
import importlib.util, json, sys
from pathlib import Path
import torch
from fastuda.config import load_config
from fastuda.data import ensure_synthetic
from fastuda.ops import _op
from fastuda.train import train

repo = Path(sys.argv[1])
spec = importlib.util.spec_from_file_location("test_train", repo / "tests" / "test_train.py")
test_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(test_train)
root = repo / "data" / "synthetic"
ensure_synthetic(str(root))
path = repo / "configs" / "demo.toml"
cfg = load_config(path, test_train.tiny_overrides(str(root), path) + ["ops.backend='triton'"])
used = {}
dispatch = _op.Op.dispatch
def recording(self, backend, *args, **kwargs):
    which = dispatch(self, backend, *args, **kwargs)
    used.setdefault(self.name, set()).add((backend, which))
    return which
_op.Op.dispatch = recording
record = train(cfg, Path(sys.argv[2]))
lines = [json.loads(x) for x in (Path(sys.argv[2]) / "metrics.jsonl").read_text().splitlines()]
logs = [x for x in lines if x["type"] == "train"]
print(json.dumps({"mIoU": record["mIoU"], "logs": logs,
                  "used": {k: sorted(map(list, v)) for k, v in used.items()}}))
"""


def test_demo_config_trains_one_step_with_ops_backend_triton(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _TRAIN_ONE_STEP, str(REPO), str(tmp_path / "run")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.0 <= out["mIoU"] <= 100.0
    # the demo is SePiCo DistCL: its loss ran the Triton kernel, the statistics and the label
    # downscaling (no Triton kernel) the C++ kernels of these CPU tensors
    assert out["used"]["dist_contrast"] == [["triton", "triton"]]
    assert out["used"]["class_stats"] == [["triton", "cpu"]]
    assert out["used"]["downscale_labels"] == [["triton", "cpu"]]
    logs = out["logs"]
    assert logs and all(torch.isfinite(torch.tensor(x["sepico.tgt.contrast"])) for x in logs)


def test_triton_falls_back_only_for_ops_without_a_triton_kernel() -> None:
    """backend="triton" on an op without a Triton kernel gives the result of the next backend
    (here the C++ kernel on CPU tensors) and says so in resolve; ops with one keep "triton"."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 4, 3, 3, generator=g)
    labels = torch.randint(0, 3, (2, 3, 3), generator=g)
    cpu = torch.device("cpu")
    for name in ("class_stats", "downscale_labels"):
        assert _op._REGISTRY[name].resolve("triton", cpu) == _op._REGISTRY[name].resolve("auto",
                                                                                         cpu)
    got = class_stats(feats, labels, 3, backend="triton")
    want = class_stats(feats, labels, 3, backend="torch")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    big = torch.randint(0, 3, (1, 8, 8), generator=g)
    assert torch.equal(downscale_labels(big, 4, num_classes=3, backend="triton"),
                       downscale_labels(big, 4, num_classes=3, backend="torch"))
    # an explicit backend that cannot serve the tensor still raises
    with pytest.raises(ValueError, match="cannot run on cpu"):
        class_stats(feats, labels, 3, backend="cuda")


def test_label_range_is_checked_with_the_dispatch() -> None:
    """The reference path, which has no kernel check, gets the range check from the dispatch:
    the same message the C++ kernel gives."""
    feats = torch.randn(1, 4, 2, 2)
    labels = torch.tensor([[[0, 1], [5, 255]]])
    message = r"label value 5 .*is outside \[0, 3\)"
    for backend in ("torch", "cpu"):
        with pytest.raises((ValueError, RuntimeError), match=message):
            class_stats(feats, labels, 3, backend=backend)
        with pytest.raises((ValueError, RuntimeError), match=message):
            downscale_labels(labels, 2, num_classes=3, backend=backend)
