"""Training entry point.

    python -m fastuda.train CONFIG [--set key=value ...] [--work-dir DIR] [--resume auto|PATH]

Read top to bottom: configuration -> process group -> model, method, self-training state -> data ->
resume -> the loop (step, log, evaluate, checkpoint). The step itself is
``fastuda.engine.self_training.SelfTraining.step`` (docs/architecture.md).

The work dir holds the resolved ``config.toml``, ``metrics.jsonl``, ``checkpoints/latest.pt`` (and
``iter_N.pt`` every checkpoint interval), ``tensorboard/`` and ``vis/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import Config, ConfigError, load_cli_config, to_toml
from .data.io import DataError
from .engine import checkpoint as ckpt
from .engine.distributed import (
    DistInfo,
    all_ranks_true,
    average_buffers,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
    wrap_student,
)
from .engine.guard import NonFiniteParameters
from .engine.logger import RunLogger
from .engine.metrics import format_table
from .engine.resume import check_resume_config
from .engine.runtime import pick_device, seed_everything
from .engine.workdir import WorkDirError, WorkDirLock, prepare_work_dir

if TYPE_CHECKING:
    from .engine.self_training import StepResult


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastuda.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="TOML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_iters=100 (repeatable)")
    p.add_argument("--work-dir", default=None, help="output folder (default work_dirs/<config>)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the work dir's newest checkpoint that loads (auto) or "
                        "from PATH")
    p.add_argument("--allow-config-change", action="store_true",
                   help="let a resume change keys that do not define the run (max_iters, "
                        "intervals, eval.*, workers, roots); model, classes, method and seed "
                        "never change")
    return p.parse_args(argv)


class Run:
    """Everything one training run holds, built from the config."""

    def __init__(self, cfg: Config, work_dir: Path, info: DistInfo, device: torch.device) -> None:
        from .data import build_train_iterators, build_val_loader
        from .data.loaders import TARGET_STREAM, build_train_iterator
        from .engine.self_training import SelfTraining
        from .methods import build_methods
        from .models import build_network

        self.cfg, self.work_dir, self.info, self.device = cfg, work_dir, info, device
        model = build_network(cfg)  # HRDAModel around the model when hrda.enabled
        methods = build_methods(cfg, model, device)
        # a method's wrapper (CorDA's heads) is part of what DDP synchronises
        model, ddp = wrap_student(methods.wrap_model(model), info, device)
        self.trainer = SelfTraining(cfg, model, methods, device, ddp_model=ddp)
        depth = any("depth" in m.batch_keys for m in methods)  # loaded by the loaders' workers
        day = any("day" in m.batch_keys for m in methods)  # Dark Zurich's day partners
        # without SyncBatchNorm (CPU) each rank's BatchNorm running statistics follow its own
        # batches: they are averaged after every step, so that student (evaluated by every rank,
        # checkpointed by rank 0) and teacher (pseudo-labels, statistics) match on every rank
        self.sync_buffers = info.enabled and device.type != "cuda"
        self.source, self.target = build_train_iterators(
            cfg.data, seed=cfg.train.seed, rank=info.rank, world_size=info.world_size,
            depth=depth, day=day)
        if cfg.self_training.class_balanced_crop and cfg.self_training.enabled:
            # whole (resized) target images: the step picks the crop from their pseudo-labels
            size = cfg.data.target.resize  # checked by check_before_start
            whole = dataclasses.replace(cfg.data, crop_size=[size[1], size[0]],
                                        ratio_range=[1.0, 1.0], scale_choices=[],
                                        cat_max_ratio=1.0)
            self.target = build_train_iterator(whole, cfg.data.target, stream=TARGET_STREAM,
                                               seed=cfg.train.seed, rank=info.rank,
                                               world_size=info.world_size, depth=depth,
                                               day=day)
        self.val_loader = build_val_loader(cfg.data, rank=info.rank, world_size=info.world_size)
        self.iteration = 0
        self.bad_steps = 0
        self.written: set[Path] = set()  # the snapshots this run wrote (the only ones it prunes)
        self.world_size_note = ""

    def check_val_data(self) -> None:
        """Touch the validation data once at start-up (one batch), so a broken val split fails
        now and not at the first evaluation hours later; zero val images is an error too."""
        from .data.io import DataError

        val = self.cfg.data.val
        dataset = getattr(self.val_loader, "dataset", None)
        if dataset is not None and len(dataset) == 0:
            raise DataError(val.root, f"the validation split {val.name}/{val.split} has no "
                                      "images (data.val)")
        next(iter(self.val_loader), None)

    def stop_requested(self, signals: object) -> bool:
        """True on every rank when SIGINT/SIGTERM reached any rank (torchrun signals them all,
        not necessarily within the same step)."""
        flag = getattr(signals, "received", None) is not None
        if self.info.enabled:
            return not all_ranks_true(not flag, self.device)
        return flag

    # -- one iteration ------------------------------------------------------------------------
    def step(self) -> StepResult:
        """Fetch the next batches (timed as the ``data`` stage) and run one training step."""
        timer = self.trainer.timer
        with timer("data"):
            source, target = next(self.source), next(self.target)
        result = self.trainer.step(source, target, self.iteration)
        if self.sync_buffers:
            average_buffers(self.trainer.student)
            average_buffers(self.trainer.teacher)
        self.iteration += 1
        return result

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "bad_steps": self.bad_steps,
                "trainer": self.trainer.state_dict(),
                "data": {"source": self.source.state_dict(), "target": self.target.state_dict()},
                "rng": ckpt.rng_state(), "config": to_toml(self.cfg),
                "world_size": self.info.world_size}

    def rank_state(self) -> dict:
        """What differs between ranks besides the data position: the RNG streams (ClassMix and
        the class-balanced crop draw from the trainer's generator as each rank's labels dictate)."""
        return {"rng": ckpt.rng_state(), "generator": self.trainer.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.source.load_state_dict(state["data"]["source"])
        self.target.load_state_dict(state["data"]["target"])
        ckpt.set_rng_state(state["rng"])
        self.iteration, self.bad_steps = state["iteration"], state["bad_steps"]
        ranks = state.get("ranks", [])
        if len(ranks) == self.info.world_size:  # each rank continues its own random streams
            ckpt.set_rng_state(ranks[self.info.rank]["rng"])
            self.trainer.generator.set_state(ranks[self.info.rank]["generator"].cpu())
        if state.get("world_size", 1) != self.info.world_size:
            self.world_size_note = (
                f"warning: checkpoint was written with world size {state['world_size']}, "
                f"resuming with {self.info.world_size}: the data order differs from an "
                "uninterrupted run")

    def save(self, name: str = "latest.pt") -> None:
        ranks = gather_objects(self.rank_state())  # collective: every rank takes part
        if self.info.is_main:
            state = self.state_dict()
            state["ranks"] = ranks
            folder = self.work_dir / "checkpoints"
            ckpt.save_checkpoint(state, folder / name)
            if name != "latest.pt":  # latest.pt names the same file: written once, on disk once
                self.written.add(folder / name)
                ckpt.link_checkpoint(folder / name, folder / "latest.pt")
                for path in ckpt.prune_snapshots(folder, self.cfg.train.keep_checkpoints,
                                                 self.written):
                    self.written.discard(path)
        barrier()

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, log: RunLogger) -> dict:
        from .evaluate import evaluate

        t0 = time.perf_counter()
        vis = self.work_dir / "vis" / f"iter_{self.iteration:06d}.png" if self.info.is_main \
            else None
        cfg = self.cfg
        if cfg.eval.max_images and self.info.enabled:
            # "the first N images of the split": this rank's share of them (the val loader gives
            # rank r the images r, r + world, ...)
            share = len(range(self.info.rank, cfg.eval.max_images, self.info.world_size))
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_images=share))
        # max_images = 0 means "all": a rank with none of the first N images evaluates nothing
        # (it still joins the all-reduce of the confusion matrix)
        loader = self.val_loader if cfg.eval.max_images or not self.cfg.eval.max_images else []
        record = evaluate(self.trainer.student, loader, cfg, self.device,
                          teacher=self.trainer.teacher if self.cfg.self_training.enabled else None,
                          vis_path=vis, autocast=self.trainer.autocast())
        record["eval_seconds"] = round(time.perf_counter() - t0, 2)
        log.log_eval(self.iteration, record)
        log.info(f"evaluation at iteration {self.iteration}:\n{format_table(record)}")
        return record


class Interrupted(Exception):  # noqa: N818 - a stop the user asked for, not a failure
    """SIGINT/SIGTERM stopped the run after writing a checkpoint."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path) -> None:
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at iteration {iteration}")


class _StopSignals:
    """While active, SIGINT and SIGTERM only set ``received``: the loop finishes the current step,
    writes a checkpoint and stops. A second signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:  # asked twice: stop now
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()


def check_before_start(cfg: Config) -> None:
    """Config facts that are known before any work and would otherwise fail deep inside a step."""
    mult = 8  # the coarsest feature map of every model is 1/8 of the crop (DeepLab: stride 8)
    if cfg.data.crop_size[0] % mult or cfg.data.crop_size[1] % mult:
        raise ConfigError(f"invalid value for data.crop_size: {cfg.data.crop_size} (expected "
                          f"multiples of {mult}; {cfg.model.name}'s output stride is "
                          f"{cfg.model.net_output_stride})")
    if cfg.data.val.num_classes != cfg.model.num_classes:
        raise ConfigError(f"invalid value for data.val.num_classes: {cfg.data.val.num_classes} "
                          f"(expected model.num_classes = {cfg.model.num_classes})")
    st = cfg.self_training
    if st.enabled and st.class_balanced_crop:
        size = cfg.data.target.resize
        if not size:
            raise ConfigError("self_training.class_balanced_crop needs data.target.resize "
                              "(whole target images of one size)")
        if size[1] < cfg.data.crop_size[0] or size[0] < cfg.data.crop_size[1]:
            raise ConfigError(f"invalid value for data.crop_size: {cfg.data.crop_size} (expected "
                              f"at most the class-balanced target data.target.resize {size} "
                              "(width, height) in each side)")


def relative_root_warnings(cfg: Config) -> list[str]:
    """Data roots are relative to the working directory (README): a relative root that does not
    exist there is most likely meant relative to somewhere else (the config file, the repo)."""
    out = []
    for dom in ("source", "target", "val"):
        root = Path(getattr(cfg.data, dom).root).expanduser()
        if not root.is_absolute() and not root.exists():
            out.append(f"warning: data.{dom}.root = {str(root)!r} is relative to the working "
                       f"directory {Path.cwd()}, where it does not exist")
    return out


def _warn_slow_autocast(cfg: Config, device: torch.device, log: RunLogger) -> None:
    """bf16/fp16 autocast on a CPU without native support runs emulated (tens of times slower)."""
    if device.type != "cpu" or cfg.train.precision == "fp32":
        return
    if cpu_has_native(cfg.train.precision):
        return
    log.info(f"warning: train.precision = {cfg.train.precision!r} on this CPU "
             f"({torch.backends.cpu.get_cpu_capability()}) has no native support and runs many "
             "times slower than fp32; set train.precision='fp32' for CPU runs")


def cpu_has_native(precision: str) -> bool:
    """bf16: AVX512-BF16 or AMX tiles; fp16: AMX-FP16 (torch.cpu's private probes, read
    defensively: a torch without them is taken as having no native support)."""
    probes = {"bf16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              "fp16": ("_is_amx_fp16_supported",)}[precision]
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _load_resume_state(work_dir: Path, resume: str) -> tuple[dict | None, Path | None,
                                                              list[str]]:
    if resume == "auto":
        found = ckpt.load_newest(work_dir)
        return found if found is not None else (None, None, [])
    path = Path(resume)
    return ckpt.load_checkpoint(path, map_location="cpu"), path, []


def train(cfg: Config, work_dir: Path, resume: str | None = None, *,
          allow_config_change: bool = False) -> dict | None:
    """Train per ``cfg`` into ``work_dir``; returns the final evaluation record (rank 0).

    One trainer per work dir (an OS lock); SIGINT/SIGTERM write a checkpoint and raise
    Interrupted."""
    device = pick_device(cfg.train.device)
    check_before_start(cfg)
    info = init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    lock = WorkDirLock(work_dir)
    try:
        if info.is_main:
            prepare_work_dir(work_dir)
            lock.acquire()
        barrier()
        with _StopSignals() as signals:
            return _train(cfg, work_dir, resume, allow_config_change, info, device, signals)
    finally:
        lock.release()
        cleanup()


def _train(cfg: Config, work_dir: Path, resume: str | None, allow_config_change: bool,
           info: DistInfo, device: torch.device, signals: _StopSignals) -> dict | None:
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    existing = ckpt.any_checkpoint(work_dir)
    if resume is None and existing is not None:
        raise WorkDirError(f"{work_dir} already holds checkpoints ({existing}); pass "
                           "--resume auto to continue that run, or choose another --work-dir")
    state, source, skipped = _load_resume_state(work_dir, resume) if resume else (None, None, [])
    changes: list[str] = []
    if state is not None:
        if not isinstance(state, dict) or "trainer" not in state or "config" not in state:
            raise ckpt.CheckpointLoadError(f"{source} is not a fastuda.train checkpoint")
        changes = check_resume_config(state["config"], cfg, str(source), allow_config_change)
    stale: list[Path] = []
    if info.is_main:  # under the lock: no other trainer is writing here
        stale = ckpt.remove_stale_temporaries(work_dir / "checkpoints")

    if info.is_main:
        for line in relative_root_warnings(cfg):
            print(line, file=sys.stderr)
    run = Run(cfg, work_dir, info, device)
    run.check_val_data()
    if state is not None:
        try:
            run.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ckpt.CheckpointLoadError(f"{source} does not match this run's model/method "
                                           f"({cfg.model.name}/{cfg.model.backbone}, "
                                           f"{'+'.join(cfg.methods) or 'no method'}): "
                                           f"{first}") from err
        del state
    t = cfg.train
    if info.is_main:  # the run is known to start: record its config
        try:
            (work_dir / "config.toml").write_text(to_toml(cfg))
        except OSError as err:
            raise WorkDirError(f"cannot write {work_dir / 'config.toml'}: "
                               f"{err.strerror or err}") from None
    images_per_step = 2 * cfg.data.batch_size * info.world_size  # source + target
    log = RunLogger(work_dir, total_iters=t.max_iters, start_iter=run.iteration,
                    images_per_step=images_per_step, enabled=info.is_main,
                    resumed=source is not None)
    if stale:
        log.info(f"removed {len(stale)} unfinished checkpoint write(s) of an earlier run: "
                 + ", ".join(p.name for p in stale))
    for line in skipped:
        log.info(f"warning: skipped a checkpoint that does not load: {line}")
    if resume == "auto" and source is None:
        log.info(f"--resume auto: no checkpoint in {work_dir}, starting from scratch")
    if source is not None:
        log.info(f"resumed from {source} at iteration {run.iteration}"
                 + (f" with config changes: {'; '.join(changes)}" if changes else ""))
        if run.world_size_note:
            log.info(run.world_size_note)
    log.info(f"training {cfg.model.name}/{cfg.model.backbone}, methods "
             f"{'+'.join(cfg.methods) or 'none'}, "
             f"{t.max_iters} iterations, {t.precision}, ops backend {cfg.ops.backend}, "
             f"device {device}, world size {info.world_size}; work dir {work_dir}")
    _warn_slow_autocast(cfg, device, log)

    window: dict[str, float] = defaultdict(float)
    n_window, t_window = 0, time.perf_counter()
    record = None
    try:
        while run.iteration < t.max_iters:
            it = run.iteration
            result = run.step()
            if not result.finite:
                run.bad_steps += 1
                log.info(f"warning: non-finite loss or gradients at iteration {it} "
                         f"({', '.join(f'{k}={v:.4g}' for k, v in result.losses.items())}); "
                         "step skipped")
                if run.bad_steps >= t.max_bad_steps:
                    run.iteration = it  # the skipped steps changed no weights
                    run.save()
                    raise SystemExit(f"error: {run.bad_steps} non-finite steps in a row; "
                                     "stopping. The last good state is in "
                                     f"{work_dir / 'checkpoints' / 'latest.pt'}")
            else:
                run.bad_steps = 0
                for k, v in result.losses.items():
                    window[k] += v
                n_window += 1
            log.step(1, {k: v for k, v in result.losses.items() if k in ("loss", "src.ce")})
            last = run.iteration == t.max_iters
            if run.iteration % t.log_interval == 0 or last:
                dt = time.perf_counter() - t_window
                values = {k: v / max(n_window, 1) for k, v in window.items()}
                values["images_per_s"] = images_per_step * n_window / max(dt, 1e-9)
                log.log_train(run.iteration, values)
                window.clear()
                n_window, t_window = 0, time.perf_counter()
            # the checkpoint comes first: a failing evaluation never costs the training
            if run.iteration % t.checkpoint_interval == 0 or last:
                run.save(f"iter_{run.iteration}.pt")
            if run.stop_requested(signals):
                if run.iteration % t.checkpoint_interval and not last:
                    run.save()
                raise Interrupted(signals.received or signal.SIGTERM, run.iteration,
                                  work_dir / "checkpoints" / "latest.pt")
            if run.iteration % t.eval_interval == 0 or last:
                try:
                    record = run.evaluate(log)
                except DataError as err:
                    if last:
                        raise
                    log.info(f"error: evaluation at iteration {run.iteration} failed: {err}; "
                             "training goes on (the checkpoint of this iteration is written)")
                t_window = time.perf_counter()
        if record is None:  # resumed a finished run: report its final state again
            record = run.evaluate(log)
    finally:
        log.close()
    return record if info.is_main else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_cli_config(args.config, args.set)
    if cfg is None:
        return 2
    from .models import PretrainedError, check_pretrained

    try:  # a bad weight file is a config error: found before the work dir or any data exists
        check_pretrained(cfg.model)
    except PretrainedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    try:
        record = train(cfg, work_dir, args.resume, allow_config_change=args.allow_config_change)
    except ConfigError as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        resume = ["python -m fastuda.train", args.config, *(f"--set {s!r}" for s in args.set),
                  f"--work-dir {work_dir}", "--resume auto"]
        print(f"stopped by {signal.Signals(stop.signum).name} at iteration {stop.iteration}; "
              f"checkpoint {stop.checkpoint}. Resume with: {' '.join(resume)}", file=sys.stderr)
        return 128 + stop.signum
    except (DataError, ckpt.CheckpointWriteError, ckpt.CheckpointLoadError, FileNotFoundError,
            WorkDirError, NonFiniteParameters) as err:  # a named file or value, not a code path
        print(f"error: {err}", file=sys.stderr)
        return 1
    if record is not None:
        print(f"target mIoU: {record['mIoU']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
