"""Issue 18: nothing a careful user does silently breaks a run. Each test reproduces a probe of the
issue (data loss, silent wrong results, tracebacks where one line is due, signals) on the tiny CPU
demo (tests/test_train.py's overrides)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import REPO, synthetic_root, tiny_overrides  # noqa: F401  (fixture)

from fastuda.config import ConfigError, load_config
from fastuda.engine.checkpoint import load_checkpoint
from fastuda.engine.workdir import WorkDirError, WorkDirLock
from fastuda.train import main, train

DEMO = REPO / "configs" / "demo_source_only.toml"


def _sets(root: str, *extra: str) -> list[str]:
    return [*tiny_overrides(root, DEMO), "train.eval_interval=100", "eval.max_images=1",
            "train.log_interval=1", *extra]


def _cli(root: str, work_dir: Path, *extra: str, resume: str | None = None,
         flags: tuple[str, ...] = ()) -> list[str]:
    args = [str(DEMO), *(x for s in _sets(root, *extra) for x in ("--set", s)),
            "--work-dir", str(work_dir), *flags]
    return [*args, "--resume", resume] if resume else args


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------
# data loss
# ----------------------------------------------------------------------------------------------
def test_snapshots_without_latest_are_resumed_or_refused_and_never_pruned(
        synthetic_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """Issue point 1: a work dir with iter_*.pt but no latest.pt was started over; the new run
    overwrote iter_N and keep_checkpoints pruned the new snapshots."""
    run = tmp_path / "run"
    train(load_config(DEMO, _sets(synthetic_root, "train.max_iters=2",
                                  "train.checkpoint_interval=1")), run)
    ckpts = run / "checkpoints"
    old_iter_1 = (ckpts / "iter_1.pt").read_bytes()
    (ckpts / "latest.pt").unlink()
    assert main(_cli(synthetic_root, run, "train.max_iters=2",
                     "train.checkpoint_interval=1")) == 1
    err = _err(capsys)
    assert "already holds checkpoints" in err and "iter_2.pt" in err and "--resume auto" in err
    assert (ckpts / "iter_1.pt").read_bytes() == old_iter_1

    # resumed from the newest snapshot; the resumed run keeps 1 snapshot of ITS OWN
    assert main(_cli(synthetic_root, run, "train.max_iters=3", "train.checkpoint_interval=1",
                     "train.keep_checkpoints=1", resume="auto",
                     flags=("--allow-config-change",))) == 0
    assert _names(ckpts) == ["iter_1.pt", "iter_2.pt", "iter_3.pt", "latest.pt"]
    assert (ckpts / "iter_1.pt").read_bytes() == old_iter_1
    assert load_checkpoint(ckpts / "latest.pt")["iteration"] == 3
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["type"] == "train"] == [1, 2, 3]


def test_one_trainer_per_work_dir(synthetic_root: str, tmp_path: Path,  # noqa: F811
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Issue point 2: a second trainer deleted the first one's checkpoint temporary as stale."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").mkdir()
    in_flight = run / "checkpoints" / ".iter_4.pt.abc.tmp"  # the holder's write under way
    in_flight.write_bytes(b"partial")
    with WorkDirLock(run):
        assert main(_cli(synthetic_root, run, "train.max_iters=1")) == 1
        err = _err(capsys)
    assert f"is in use by another trainer (pid {os.getpid()})" in err
    assert in_flight.exists()  # only removed under the lock
    assert not (run / "metrics.jsonl").exists() and not (run / "config.toml").exists()


def test_the_kernel_releases_the_lock_of_a_killed_trainer(tmp_path: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from fastuda.engine.workdir import "
            "WorkDirLock; WorkDirLock(Path(sys.argv[1])).acquire(); print('locked', flush=True);"
            " time.sleep(60)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkDirError, match=f"pid {holder.pid}"):
        WorkDirLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = WorkDirLock(tmp_path)
    lock.acquire()  # no stale lock: the kernel dropped it with the process
    lock.release()


def test_val_config_is_checked_at_start_and_the_checkpoint_precedes_evaluation(
        synthetic_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue point 3: a val problem surfaced at the first evaluation, before its checkpoint."""
    run = tmp_path / "run"
    assert main(_cli(synthetic_root, run, "data.val.num_classes=7")) == 2
    assert "data.val.num_classes: 7" in _err(capsys)
    assert not (run / "checkpoints" / "latest.pt").exists()
    assert main(_cli(synthetic_root, run, "eval.stride=[0, 0]")) == 2
    assert "eval.stride" in _err(capsys)

    import fastuda.evaluate as evaluate_module
    from fastuda.data.io import DataError

    calls = []
    real = evaluate_module.evaluate

    def failing_once(*args, **kw):  # a truncated val image met at the first evaluation
        calls.append(1)
        if len(calls) == 1:
            raise DataError("val/img_3.png", "unreadable or truncated image")
        return real(*args, **kw)

    monkeypatch.setattr(evaluate_module, "evaluate", failing_once)
    record = train(load_config(DEMO, _sets(synthetic_root, "train.max_iters=2",
                                           "train.eval_interval=1",
                                           "train.checkpoint_interval=1")), run)
    out = capsys.readouterr()
    assert "error: evaluation at iteration 1 failed: val/img_3.png: unreadable" in out.out + out.err
    assert record is not None and len(calls) == 2
    assert (run / "checkpoints" / "iter_1.pt").is_file()  # written before the failing eval
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["iteration"] == 2


def test_a_refused_resume_leaves_the_record_alone(synthetic_root: str, tmp_path: Path,  # noqa: F811
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Issue point 4: a failed resume rewrote config.toml (seed 7 for a seed-0 run)."""
    run = tmp_path / "run"
    assert main(_cli(synthetic_root, run, "train.max_iters=1")) == 0
    before = (run / "config.toml").read_text()
    assert "seed = 0" in before
    capsys.readouterr()
    assert main(_cli(synthetic_root, run, "train.max_iters=1", "train.seed=7",
                     "model.backbone='resnet50'", resume="auto",
                     flags=("--allow-config-change",))) == 2
    err = _err(capsys)
    assert "model.backbone ('resnet18' -> 'resnet50')" in err and "train.seed (0 -> 7)" in err
    assert main(_cli(synthetic_root, run, "train.max_iters=1", "methods=['sepico']",
                     "model.projection=true", resume="auto")) == 2
    assert "methods ([] -> ['sepico'])" in _err(capsys)
    assert main(_cli(synthetic_root, run, "train.max_iters=2", resume="auto")) == 2
    err = _err(capsys)
    assert "train.max_iters (1 -> 2)" in err and "--allow-config-change" in err
    assert (run / "config.toml").read_text() == before


def test_a_corrupt_newest_checkpoint_falls_back_to_an_intact_one(
        synthetic_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """Issue point 5a: a corrupt iter_2.pt (latest.pt is its hard link) ended in a traceback."""
    run = tmp_path / "run"
    assert main(_cli(synthetic_root, run, "train.max_iters=2",
                     "train.checkpoint_interval=1")) == 0
    ckpts = run / "checkpoints"
    with open(ckpts / "iter_2.pt", "r+b") as fh:  # a disk error: the file is cut short
        fh.truncate(1000)
    capsys.readouterr()
    assert main(_cli(synthetic_root, run, "train.max_iters=2", "train.checkpoint_interval=1",
                     resume="auto")) == 0
    out = capsys.readouterr()
    assert "skipped a checkpoint that does not load: cannot load checkpoint" in out.err + out.out
    assert "resumed from" in out.err + out.out and "iter_1.pt at iteration 1" in out.err + out.out
    assert load_checkpoint(ckpts / "latest.pt")["iteration"] == 2

    for path in ckpts.glob("*.pt"):
        path.write_bytes(b"garbage")
    assert main(_cli(synthetic_root, run, "train.max_iters=2", resume="auto")) == 1
    err = _err(capsys)
    assert err.startswith(f"error: no checkpoint in {ckpts} loads")


# ----------------------------------------------------------------------------------------------
# silent wrong results
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("optim.lr", "inf"), ("optim.lr", "-1e-3"), ("optim.lr", "nan"), ("optim.weight_decay", "-1"),
    ("optim.betas", "[0.9, 1.0]"), ("optim.betas", "[0.9]"), ("optim.warmup_iters", "-1"),
    ("optim.poly_power", "0"), ("eval.batch_size", "0"), ("train.max_bad_steps", "0")])
def test_optimiser_and_eval_values_are_validated(key: str, value: str) -> None:
    """Issue point 6: optim.lr=inf trained NaN weights and reported an mIoU with exit 0."""
    with pytest.raises(ConfigError, match=f"invalid value for {key}"):
        load_config(DEMO, [f"{key}={value}"])


def test_a_non_finite_update_is_skipped_or_stops_the_run() -> None:
    from fastuda.engine.guard import NonFiniteParameters, guarded_step

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(2, 4)).sum().backward()
    net.weight.grad[0, 0] = float("inf")  # finite loss, overflowing gradient
    assert guarded_step(opt, scaler, list(net.parameters()), grad_clip=0.0) is False
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert all(p.grad is None for p in net.parameters())

    net(torch.randn(2, 4)).sum().backward()
    for group in opt.param_groups:  # what optim.lr=inf did before it was validated
        group["lr"] = float("inf")
    with pytest.raises(NonFiniteParameters):
        guarded_step(opt, scaler, list(net.parameters()), grad_clip=1.0)


def test_zero_val_images_is_an_error_and_metrics_are_strict_json(
        synthetic_root: str, tmp_path: Path) -> None:  # noqa: F811
    """Issue point 9: an evaluation over zero images printed `target mIoU: nan`, and NaN went
    into metrics.jsonl."""
    from fastuda.data.io import DataError
    from fastuda.engine.logger import RunLogger
    from fastuda.evaluate import evaluate

    cfg = load_config(DEMO, _sets(synthetic_root))
    with pytest.raises(DataError, match="saw no labelled pixels"):
        evaluate(torch.nn.Identity(), [], cfg, torch.device("cpu"))
    log = RunLogger(tmp_path, total_iters=1, tensorboard=False)
    log.log_eval(1, {"mIoU": 12.5, "IoU": {"road": float("nan"), "car": 25.0}})
    log.log_train(1, {"loss": float("inf")})
    log.close()

    def reject(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    rows = [json.loads(x, parse_constant=reject)
            for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["IoU"] == {"road": None, "car": 25.0} and rows[1]["loss"] is None


# ----------------------------------------------------------------------------------------------
# signals, and no step logged twice after a resume
# ----------------------------------------------------------------------------------------------
def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_a_resume_logs_no_step_twice(synthetic_root: str, tmp_path: Path) -> None:  # noqa: F811
    """A run killed after logging iteration 2 but before its checkpoint resumes from iteration 1:
    iteration 2's metrics row and TensorBoard scalars must not appear twice."""
    run = tmp_path / "run"
    sets = _sets(synthetic_root, "train.max_iters=2", "train.checkpoint_interval=1",
                 "train.keep_checkpoints=0")
    train(load_config(DEMO, sets), run)
    for name in ("iter_2.pt", "latest.pt"):  # the kill came before checkpoint 2 was written
        (run / "checkpoints" / name).unlink()
    time.sleep(1.0)  # a new TensorBoard event file name (it holds the time in seconds)
    train(load_config(DEMO, sets), run, resume="auto")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["type"] == "train"] == [1, 2]
    assert [r["iter"] for r in rows if r["type"] == "eval"] == [2]
    assert _tensorboard_steps(run / "tensorboard", "train/loss") == [1, 2]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_writes_a_checkpoint_and_says_how_to_resume(
        synthetic_root: str, tmp_path: Path, sig: signal.Signals) -> None:  # noqa: F811
    run = tmp_path / "run"
    args = _cli(synthetic_root, run, "train.max_iters=30", "train.checkpoint_interval=100")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastuda.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not (
            metrics.is_file() and '"train"' in metrics.read_text()):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"stopped by {sig.name} at iteration "), line
    assert "--resume auto" in line and f"--work-dir {run}" in line
    stopped = int(line.split("at iteration ")[1].split(";")[0])
    assert 1 <= stopped < 30
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["iteration"] == stopped


# ----------------------------------------------------------------------------------------------
# tracebacks where one line is due
# ----------------------------------------------------------------------------------------------
def _folder_dataset(root: Path, corrupt: bool) -> None:
    """A 'folder' dataset of two 64x64 images; the images cut in half when ``corrupt``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        for sub, arr in (("images", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                         ("labels", rng.integers(0, 19, (64, 64), dtype=np.uint8))):
            path = root / sub / "train" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            if corrupt and sub == "images":
                path.write_bytes(path.read_bytes()[:200])


def test_user_errors_are_one_line(synthetic_root: str, tmp_path: Path,  # noqa: F811
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Each probe of the issue's list ends in one `error:` line naming the file, key or value
    (exit 1: files and data, 2: config), not a traceback."""
    def check(code: int, needle: str, *extra: str, work_dir: Path | None = None,
              resume: str | None = None, config: Path | None = None) -> None:
        args = _cli(synthetic_root, work_dir or tmp_path / "w", *extra, resume=resume)
        if config is not None:
            args[0] = str(config)
        assert main(args) == code, needle
        err = _err(capsys)
        assert err.startswith("error: ") and needle in err, err

    check(1, f"checkpoint not found: {tmp_path / 'nope.pt'}", resume=str(tmp_path / "nope.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    check(1, f"{tmp_path / 'foreign.pt'} is not a fastuda.train checkpoint",
          resume=str(tmp_path / "foreign.pt"))
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04torn")
    check(1, f"cannot load checkpoint {tmp_path / 'torn.pt'}", resume=str(tmp_path / "torn.pt"))
    if not torch.cuda.is_available():
        check(2, "train.device = 'cuda' but no CUDA device is visible", "train.device='cuda'")
    check(2, "self_training.class_balanced_crop needs data.target.resize",
          "self_training.enabled=true", "self_training.class_balanced_crop=true",
          "data.target.resize=[]")
    check(2, "data.crop_size: [60, 64]", "data.crop_size=[60, 64]")
    check(2, "at most the class-balanced target", "self_training.enabled=true",
          "self_training.class_balanced_crop=true", "data.crop_size=[128, 128]")
    check(2, "invalid value for optim.lr: -0.001", "optim.lr=-1e-3")
    (tmp_path / "file").write_text("x")
    check(1, f"{tmp_path / 'file'} is a file, not a folder", work_dir=tmp_path / "file")
    for sub in ("checkpoints", "vis", "tensorboard"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / sub).write_text("x")
        check(1, f"{tmp_path / sub / sub} is a file, not a folder", work_dir=tmp_path / sub)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(DEMO.read_bytes().replace(b"\n", b"\n# caf\xe9\n", 1))
    check(2, f"{latin1}: not UTF-8 text", config=latin1)
    foreign = tmp_path / "my_photos"
    (foreign / "2024").mkdir(parents=True)
    check(1, f"{foreign}: is a non-empty folder that holds no synthetic dataset",
          f"data.source.root={str(foreign)!r}")
    assert not list(tmp_path.glob(".my_photos.lock"))
    broken = tmp_path / "broken"
    _folder_dataset(broken, corrupt=True)
    check(1, f"{broken / 'images' / 'train'}", "data.source.name='folder'",
          f"data.source.root={str(broken)!r}", "data.rcs=false", "data.num_workers=1")


# ----------------------------------------------------------------------------------------------
# small things
# ----------------------------------------------------------------------------------------------
def test_the_rcs_hint_names_a_command_that_exists() -> None:
    from fastuda.data.stats import prepare_hint
    from fastuda.prepare import DEFAULT_SPLITS

    for name in ("gta", "synthia", "cityscapes", "synthetic_source", "synthetic_night"):
        hint = prepare_hint(name, "data/x")
        command = hint.split("`")[1].split()
        assert command[:3] == ["python", "-m", "fastuda.prepare"]
        assert command[3] in [*DEFAULT_SPLITS, "synthetic"] and command[4] == "data/x"
    assert "data.rcs = false" in prepare_hint("folder", "data/x")


def test_a_relative_root_that_does_not_exist_warns(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from fastuda.train import relative_root_warnings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    cfg = load_config(DEMO, ["data.source.root='here'", "data.target.root='not/here'",
                             f"data.val.root={str(tmp_path / 'absolute')!r}"])
    assert relative_root_warnings(cfg) == [
        f"warning: data.target.root = 'not/here' is relative to the working directory "
        f"{tmp_path}, where it does not exist"]


def test_emulated_low_precision_on_cpu_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastuda.train import _warn_slow_autocast

    lines: list[str] = []

    class Log:
        def info(self, msg: str) -> None:
            lines.append(msg)

    import fastuda.train as train_module

    monkeypatch.setattr(train_module, "cpu_has_native", lambda precision: False)  # e.g. AVX2
    for precision in ("fp32", "bf16", "fp16"):
        cfg = load_config(DEMO, [f"train.precision={precision!r}"])
        _warn_slow_autocast(cfg, torch.device("cpu"), Log())  # type: ignore[arg-type]
    assert len(lines) == 2 and "'bf16' on this CPU" in lines[0] and "'fp16'" in lines[1]
    monkeypatch.setattr(train_module, "cpu_has_native", lambda precision: True)
    _warn_slow_autocast(load_config(DEMO, ["train.precision='bf16'"]), torch.device("cpu"),
                        Log())  # type: ignore[arg-type]
    assert len(lines) == 2
