"""End to end: every shipped config trains one iteration (model and crop shrunk through overrides,
data redirected to the synthetic pair), and a run killed with SIGKILL resumes exactly."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fastuda.config import ModelConfig, load_config
from fastuda.data import ensure_synthetic
from fastuda.engine.checkpoint import load_checkpoint
from fastuda.train import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("**/*.toml") if "_base" not in p.parts)


@pytest.fixture(scope="session")
def synthetic_root() -> str:
    root = REPO / "data" / "synthetic"
    ensure_synthetic(str(root))
    return str(root)


def tiny_pretrained(name: str, backbone: str) -> Path:
    """A local ImageNet-layout file of the small backbone (random weights, written once): the
    presets with the ImageNet feature distance ("fdist") need model.pretrained."""
    from fastuda.models import build_model

    path = Path(tempfile.gettempdir()) / f"fastuda_tests_{backbone}_{os.getuid()}.pth"
    if not path.is_file():
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=name, backbone=backbone, projection=False))
        state = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()
                 if k.startswith("backbone.")}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    return path


def fake_dark_zurich(synthetic: str, n_train: int = 6, n_val: int = 2) -> str:
    """A Dark Zurich tree (layout of fastuda/data/datasets.py, with the correspondence lists and
    day images of SePiCo's day/night variant) made of the synthetic pair: night images of the
    synthetic night domain, each paired with a synthetic (day) target image of the same size;
    val: night val images with their labels. Written once per test session."""
    out = Path(tempfile.gettempdir()) / f"fastuda_tests_dark_zurich_{os.getuid()}"
    if (out / "done").is_file():
        return str(out)
    src = Path(synthetic)
    nights = sorted((src / "night" / "leftImg8bit" / "train").glob("*/*.png"))[:n_train]
    days = sorted((src / "target" / "leftImg8bit" / "train").glob("*/*.png"))[:n_train]
    lines = []
    for i, (night, day) in enumerate(zip(nights, days, strict=True)):
        for kind, image in (("night", night), ("day", day)):
            seq = "GOPR0356" if kind == "night" else "GOPR0351"
            dst = out / "rgb_anon" / "train" / kind / seq / f"{seq}_frame_{i:06d}_rgb_anon.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, dst)
        lines.append(f"train/night/GOPR0356/GOPR0356_frame_{i:06d},"
                     f"train/day/GOPR0351/GOPR0351_frame_{i:06d}\n")
    (out / "corresp" / "train" / "night").mkdir(parents=True, exist_ok=True)
    (out / "corresp" / "train" / "night" / "GOPR0356.csv").write_text("".join(lines))
    vals = sorted((src / "night" / "leftImg8bit" / "val").glob("*/*.png"))[:n_val]
    for i, image in enumerate(vals):
        stem = image.name[: -len("_leftImg8bit.png")]
        label = (src / "night" / "gtFine" / "val" / image.parent.name /
                 f"{stem}_gtFine_labelTrainIds.png")
        name = f"GOPR0356_frame_{i:06d}"
        for dst, f in ((out / "rgb_anon" / "val" / "night" / "GOPR0356" /
                        f"{name}_rgb_anon.png", image),
                       (out / "gt" / "val" / "night" / "GOPR0356" /
                        f"{name}_gt_labelTrainIds.png", label)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    (out / "done").write_text("")
    return str(out)


def tiny_overrides(root: str, cfg_path: Path) -> list[str]:
    cfg = load_config(cfg_path)
    small = {"deeplabv2": "resnet18", "daformer": "mit_b0", "vit": "dinov2_vits14"}[cfg.model.name]
    sets = [f"model.backbone={small!r}", "model.embed_dim=32", "model.decoder_channels=32",
            "data.crop_size=[64, 64]", "data.num_workers=0", "data.rcs_min_pixels=10",
            "train.max_iters=1", "train.device='cpu'", "eval.mode='whole'", "eval.max_images=2",
            "eval.num_vis=1",
            # fp16 autocast on a CPU without fp16 arithmetic is emulated: 2-3x slower
            "train.precision='fp32'"]
    sets += [f"{name}.start_iter=0" for name in cfg.methods
             if hasattr(cfg.settings(name), "start_iter")]
    if "fdist" in cfg.methods:  # the frozen ImageNet model comes from model.pretrained
        sets.append(f"model.pretrained={str(tiny_pretrained(cfg.model.name, small))!r}")
    if cfg.hrda.enabled:  # a detail crop inside the 64x64 crop
        sets += ["hrda.detail_crop=[32, 32]", "hrda.attention_channels=8"]
    if "cluda" in cfg.methods:  # a small contrast grid and pair-weight head
        sets += ["cluda.grid=[8, 8]", "cluda.head_channels=8"]
    for dom, name in (("source", "synthetic_source"), ("target", "synthetic_target"),
                      ("val", "synthetic_target")):
        split = "val" if dom == "val" else "train"
        # whole target images of one size, for SePiCo's class-balanced crop
        resize = "[96, 64]" if dom == "target" else "[]"
        sets += [f"data.{dom}.name={name!r}", f"data.{dom}.root={root!r}",
                 f"data.{dom}.resize={resize}", f"data.{dom}.split={split!r}"]
    if "daynight" in cfg.methods:  # night target images with day partners (a Dark Zurich tree)
        dz = fake_dark_zurich(root)
        sets += [f"data.{dom}.{k}={v!r}" for dom in ("target", "val")
                 for k, v in (("name", "dark_zurich"), ("root", dz))]
    return sets


def test_dark_zurich_day_night_variant_trains_a_few_iterations(synthetic_root: str,
                                                               tmp_path: Path) -> None:
    """SePiCo's released Cityscapes->Dark Zurich variant end to end on the CPU: night targets
    with their day partners (the synthetic pair's night images and day target images, paired by
    the Dark Zurich correspondence list of fake_dark_zurich), three iterations with the
    contrast on, an evaluation with the test-time re-weighting; every loss finite."""
    path = REPO / "configs" / "sepico" / "deeplabv2_dist_cs2darkzurich.toml"
    cfg = load_config(path, [*tiny_overrides(synthetic_root, path), "train.max_iters=3",
                             "train.log_interval=1", "train.eval_interval=3"])
    assert cfg.methods == ["sepico", "daynight"] and cfg.data.target.name == "dark_zurich"
    record = train(cfg, tmp_path / "run")
    assert record is not None and 0.0 <= record["mIoU"] <= 100.0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logs = [x for x in lines if x["type"] == "train"]
    assert len(logs) == 3
    for x in logs:
        assert all(math.isfinite(x[k]) for k in ("src.ce", "mix.ce", "sepico.tgt.contrast"))


@pytest.mark.parametrize("path", CONFIGS,
                         ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_config_trains_one_iteration(path: Path, synthetic_root: str, tmp_path: Path) -> None:
    cfg = load_config(path, tiny_overrides(synthetic_root, path))
    record = train(cfg, tmp_path / "run")
    assert record is not None and 0.0 <= record["mIoU"] <= 100.0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_logs = [x for x in lines if x["type"] == "train"]
    assert train_logs and all(torch.isfinite(torch.tensor(x["src.ce"])) for x in train_logs)
    if "sepico" in cfg.methods:
        assert "sepico.src.contrast" in train_logs[0] and "sepico.tgt.contrast" in train_logs[0]
    if cfg.hrda.enabled:
        assert {"src.ce_detail", "mix.ce_detail"} <= set(train_logs[0])
    if "cluda" in cfg.methods:
        assert {"cluda.src.contrast", "cluda.mix.contrast"} <= set(train_logs[0])
    if "mic" in cfg.methods:
        assert "mic.masked.ce" in train_logs[0]
    if "fdist" in cfg.methods:
        assert "fdist.src.feat_dist" in train_logs[0]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["iteration"] == 1
    # the final snapshot and latest.pt are one file on disk (checkpoints of large models add up)
    snapshot = tmp_path / "run" / "checkpoints" / "iter_1.pt"
    assert snapshot.stat().st_ino == (tmp_path / "run" / "checkpoints" / "latest.pt").stat().st_ino
    assert (tmp_path / "run" / "config.toml").is_file()
    assert list((tmp_path / "run" / "vis").glob("*.png"))


def test_cli_reports_a_full_disk_and_a_missing_dataset(synthetic_root: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The errors a user can fix come out as one line naming the file (exit 1), no traceback."""
    import errno

    import fastuda.engine.checkpoint as checkpoint
    from fastuda.train import main

    path = REPO / "configs" / "demo_source_only.toml"
    sets = [x for s in tiny_overrides(synthetic_root, path) for x in ("--set", s)]

    def full_disk(obj, fh) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    assert main([str(path), *sets, "--work-dir", str(tmp_path / "full")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: [Errno 28] cannot write checkpoint ") and "latest.pt" not in err
    assert "iter_1.pt: No space left on device" in err
    monkeypatch.undo()

    missing = tmp_path / "no_such_dataset"
    sets += ["--set", "data.source.name='gta'", "--set", f"data.source.root={str(missing)!r}"]
    assert main([str(path), *sets, "--work-dir", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert f"error: {missing}" in err and "Traceback" not in err, err


def test_evaluate_cli_with_hrda(synthetic_root: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m fastuda.evaluate`` builds the HRDA network and runs its inference."""
    from fastuda.evaluate import main
    from fastuda.models import HRDAModel, build_network

    path = REPO / "configs" / "demo_cluda_hrda.toml"
    sets = tiny_overrides(synthetic_root, path)
    cfg = load_config(path, sets)
    net = build_network(cfg)
    assert isinstance(net, HRDAModel)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    args = [str(path), "--checkpoint", str(tmp_path / "weights.pt")]
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= record["mIoU"] <= 100.0

    # the wrong file, or another model's weights: one line that names them, exit 1
    other = REPO / "configs" / "demo_source_only.toml"
    other_sets = [x for s in tiny_overrides(synthetic_root, other) for x in ("--set", s)]
    assert main([str(other), "--checkpoint", str(tmp_path / "missing.pt"), *other_sets]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert main([str(other), "--checkpoint", str(tmp_path / "weights.pt"), *other_sets]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'weights.pt'} does not hold weights of the model {other}" in err
    assert "Traceback" not in err


def test_vit_in_hrda_mode_trains_and_evaluates(synthetic_root: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A DINOv2 ViT inside HRDA (DAFormer head, SePiCo): one training iteration, then
    ``python -m fastuda.evaluate`` on its weights (HRDA's multi-resolution inference)."""
    from fastuda.evaluate import main

    path = REPO / "configs" / "demo_vit.toml"
    sets = tiny_overrides(synthetic_root, path) + [
        "hrda.enabled=true", "hrda.detail_crop=[32, 32]", "hrda.attention_channels=8",
        "model.vit_head='daformer'",
        # few sliding detail windows (each a ViT forward): small val images, stride = window
        "hrda.slide_stride=[32, 32]", "data.val.resize=[64, 64]"]
    record = train(load_config(path, sets), tmp_path / "run")
    assert record is not None and 0.0 <= record["mIoU"] <= 100.0
    logs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_log = [x for x in logs if x["type"] == "train"][0]
    assert {"src.ce", "src.ce_detail", "mix.ce_detail", "sepico.src.contrast"} <= set(train_log)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    torch.save(state["trainer"]["teacher"], tmp_path / "teacher.pt")
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    args = [str(path), "--checkpoint", str(tmp_path / "teacher.pt")]
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mIoU"] <= 100.0


@pytest.mark.parametrize("demo", ["demo_cluda", "demo_spcl", "demo_bipcl", "demo_corda"])
def test_every_contrast_method_trains_on_a_vit(demo: str, synthetic_root: str,
                                              tmp_path: Path) -> None:
    """CLUDA, SPCL, BiPCL and CorDA on a DINOv2 ViT (SePiCo: the vfm and demo_vit configs)."""
    path = REPO / "configs" / f"{demo}.toml"
    sets = tiny_overrides(synthetic_root, path) + [
        "model.name='vit'", "model.backbone='dinov2_vits14'", "model.drop_path=0.0",
        "model.output_stride=0", "data.val.resize=[64, 64]"]
    cfg = load_config(path, sets)
    record = train(cfg, tmp_path / "run")
    assert record is not None and 0.0 <= record["mIoU"] <= 100.0
    logs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = [x for x in logs if x["type"] == "train"][0]
    assert all(math.isfinite(v) for v in first.values() if isinstance(v, float))
    own = [k for k in first if k.startswith(f"{demo.removeprefix('demo_')}.")]
    assert own, f"{demo}: no method loss logged ({sorted(first)})"


def _run(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "fastuda.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_resume_after_sigkill_is_exact(synthetic_root: str, tmp_path: Path) -> None:
    # the SePiCo demo with MIC's masked pass added: two methods, four passes per step
    cfg_path = REPO / "configs" / "demo_sepico_mic.toml"
    sets = tiny_overrides(synthetic_root, cfg_path)
    sets += ["train.max_iters=6", "train.checkpoint_interval=1", "train.eval_interval=3",
             "train.log_interval=1", "train.deterministic=true", "sepico.start_iter=2",
             "data.num_workers=1", "train.keep_checkpoints=1",
             # the released EMA rule (the demos keep "same"): alpha(it + 1) after step it
             "self_training.ema_alpha_step=\"next\""]
    args = ["configs/demo_sepico_mic.toml", *(x for s in sets for x in ("--set", s))]

    whole = _run([*args, "--work-dir", str(tmp_path / "whole")])
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out
    # one snapshot kept (each is ~180 MB): the newest, which latest.pt also names
    checkpoints = tmp_path / "whole" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_6.pt", "latest.pt"]
    a = load_checkpoint(checkpoints / "latest.pt")
    shutil.rmtree(checkpoints)  # in memory now: the disk is left to the killed run

    killed_dir = tmp_path / "killed"
    # the trainer alone is killed, as the out-of-memory killer would: its loader workers die
    # with it (tests/data/test_data_workers.py)
    victim = _run([*args, "--work-dir", str(killed_dir)])
    latest = killed_dir / "checkpoints" / "latest.pt"

    def snapshot_reached() -> bool:  # a directory listing: cheap enough to poll every 10 ms
        return any(int(p.stem.removeprefix("iter_")) >= 2
                   for p in (killed_dir / "checkpoints").glob("iter_*.pt"))

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and victim.poll() is None and not snapshot_reached():
        time.sleep(0.01)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stopped_at = load_checkpoint(latest)["iteration"]
    assert 1 <= stopped_at < 6  # latest.pt may still name iter_1 for a moment

    # a write the kill may have cut short leaves a temporary file; the resumed run removes it
    (killed_dir / "checkpoints" / ".iter_9.pt.killed.tmp").write_bytes(b"torn")
    resumed = _run([*args, "--work-dir", str(killed_dir), "--resume", "auto"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "removed" in out and ".iter_9.pt.killed.tmp" in out
    assert not list((killed_dir / "checkpoints").glob(".*.tmp"))

    b = load_checkpoint(latest)
    assert a["iteration"] == b["iteration"] == 6
    def assert_same(x: object, y: object, where: str) -> None:
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{where} differs after resume"
        elif isinstance(x, dict):
            for k in x:
                assert_same(x[k], y[k], f"{where}.{k}")

    for part in ("student", "teacher", "methods", "optimizer"):
        assert_same(a["trainer"][part], b["trainer"][part], part)
    evals_a = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text()
               .splitlines() if '"eval"' in x]
    evals_b = [json.loads(x) for x in (killed_dir / "metrics.jsonl").read_text().splitlines()
               if '"eval"' in x]
    final_a = [e for e in evals_a if e["iter"] == 6][-1]
    final_b = [e for e in evals_b if e["iter"] == 6][-1]
    assert final_a["mIoU"] == final_b["mIoU"] and final_a["IoU"] == final_b["IoU"]


def test_resume_with_sgd_is_exact(synthetic_root: str, tmp_path: Path) -> None:
    """The SPCL preset (SGD with momentum, poly horizon 62 500, frozen BN) resumed from its
    iteration-2 snapshot ends where the uninterrupted run ends: the momentum buffers are part of
    the checkpoint (loaded with weights_only=True) and the schedule continues."""
    path = REPO / "configs" / "spcl" / "deeplabv2_gta2cs.toml"
    sets = tiny_overrides(synthetic_root, path) + [
        "train.max_iters=4", "train.checkpoint_interval=2", "train.eval_interval=4",
        "train.deterministic=true", "train.keep_checkpoints=0", "data.batch_size=2"]
    cfg = load_config(path, sets)
    assert cfg.optim.name == "sgd" and cfg.model.freeze_bn
    train(cfg, tmp_path / "whole")
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "latest.pt")
    train(load_config(path, sets), tmp_path / "resumed",
          resume=str(tmp_path / "whole" / "checkpoints" / "iter_2.pt"))
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")
    assert a["iteration"] == b["iteration"] == 4
    momentum = [s["momentum_buffer"] for s in a["trainer"]["optimizer"]["state"].values()]
    assert momentum and all(isinstance(m, torch.Tensor) for m in momentum)

    def assert_same(x: object, y: object, where: str) -> None:
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{where} differs after resume"
        elif isinstance(x, dict):
            assert set(x) == set(y), where
            for k in x:
                assert_same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list | tuple):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                assert_same(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    for part in ("student", "teacher", "methods", "optimizer"):
        assert_same(a["trainer"][part], b["trainer"][part], part)
