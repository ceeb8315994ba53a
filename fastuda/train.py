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
import sys
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
    average_buffers,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
    wrap_student,
)
from .engine.logger import RunLogger
from .engine.metrics import format_table
from .engine.runtime import pick_device, seed_everything

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
                   help="continue from the work dir's latest checkpoint (auto) or from PATH")
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
        # without SyncBatchNorm (CPU) each rank's BatchNorm running statistics follow its own
        # batches: they are averaged after every step, so that student (evaluated by every rank,
        # checkpointed by rank 0) and teacher (pseudo-labels, statistics) match on every rank
        self.sync_buffers = info.enabled and device.type != "cuda"
        self.source, self.target = build_train_iterators(
            cfg.data, seed=cfg.train.seed, rank=info.rank, world_size=info.world_size,
            depth=depth)
        if cfg.self_training.class_balanced_crop and cfg.self_training.enabled:
            # whole (resized) target images: the step picks the crop from their pseudo-labels
            size = cfg.data.target.resize
            if not size:
                raise ConfigError("self_training.class_balanced_crop needs data.target.resize "
                                  "(whole target images of one size)")
            whole = dataclasses.replace(cfg.data, crop_size=[size[1], size[0]],
                                        ratio_range=[1.0, 1.0], cat_max_ratio=1.0)
            self.target = build_train_iterator(whole, cfg.data.target, stream=TARGET_STREAM,
                                               seed=cfg.train.seed, rank=info.rank,
                                               world_size=info.world_size, depth=depth)
        self.val_loader = build_val_loader(cfg.data, rank=info.rank, world_size=info.world_size)
        self.iteration = 0
        self.bad_steps = 0

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

    def load_state_dict(self, state: dict, log: RunLogger) -> None:
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
            log.info(f"warning: checkpoint was written with world size {state['world_size']}, "
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
                ckpt.link_checkpoint(folder / name, folder / "latest.pt")
                ckpt.prune_snapshots(folder, self.cfg.train.keep_checkpoints)
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


def train(cfg: Config, work_dir: Path, resume: str | None = None) -> dict | None:
    """Train per ``cfg`` into ``work_dir``; returns the final evaluation record (rank 0)."""
    device = pick_device(cfg.train.device)
    info = init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    work_dir.mkdir(parents=True, exist_ok=True)
    latest = ckpt.find_latest(work_dir)
    if resume is None and latest is not None:
        raise SystemExit(f"error: {work_dir} already holds checkpoints ({latest}); pass "
                         "--resume auto to continue that run, or choose another --work-dir")
    stale: list[Path] = []
    if info.is_main:
        (work_dir / "config.toml").write_text(to_toml(cfg))
        stale = ckpt.remove_stale_temporaries(work_dir / "checkpoints")

    run = Run(cfg, work_dir, info, device)
    t = cfg.train
    images_per_step = 2 * cfg.data.batch_size * info.world_size  # source + target
    log = RunLogger(work_dir, total_iters=t.max_iters, images_per_step=images_per_step,
                    enabled=info.is_main)
    if stale:
        log.info(f"removed {len(stale)} unfinished checkpoint write(s) of an earlier run: "
                 + ", ".join(p.name for p in stale))
    if resume is not None:
        path = latest if resume == "auto" else Path(resume)
        if path is None:
            log.info(f"--resume auto: no checkpoint in {work_dir}, starting from scratch")
        else:
            # on the CPU: RNG states must stay CPU tensors; the loaders move the rest
            run.load_state_dict(ckpt.load_checkpoint(path, map_location="cpu"), log)
            log.info(f"resumed from {path} at iteration {run.iteration}")
            log.step(run.iteration, resumed=True)
    log.info(f"training {cfg.model.name}/{cfg.model.backbone}, methods "
             f"{'+'.join(cfg.methods) or 'none'}, "
             f"{t.max_iters} iterations, {t.precision}, ops backend {cfg.ops.backend}, "
             f"device {device}, world size {info.world_size}; work dir {work_dir}")

    window: dict[str, float] = defaultdict(float)
    n_window, t_window = 0, time.perf_counter()
    record = None
    try:
        while run.iteration < t.max_iters:
            it = run.iteration
            result = run.step()
            if not result.finite:
                run.bad_steps += 1
                log.info(f"warning: non-finite loss at iteration {it} "
                         f"({', '.join(f'{k}={v:.4g}' for k, v in result.losses.items())}); "
                         "step skipped")
                if run.bad_steps >= t.max_bad_steps:
                    run.iteration = it  # the skipped steps changed no weights
                    run.save()
                    raise SystemExit(f"error: {run.bad_steps} non-finite losses in a row; "
                                     "stopping. The last good state is in "
                                     f"{work_dir / 'checkpoints' / 'latest.pt'}")
            else:
                run.bad_steps = 0
                for k, v in result.losses.items():
                    window[k] += v
                n_window += 1
            log.step(1, {k: v for k, v in result.losses.items() if k in ("loss", "src.ce")})
            if run.iteration % t.log_interval == 0 or run.iteration == t.max_iters:
                dt = time.perf_counter() - t_window
                values = {k: v / max(n_window, 1) for k, v in window.items()}
                values["images_per_s"] = images_per_step * n_window / max(dt, 1e-9)
                log.log_train(run.iteration, values)
                window.clear()
                n_window, t_window = 0, time.perf_counter()
            if run.iteration % t.eval_interval == 0 or run.iteration == t.max_iters:
                record = run.evaluate(log)
                t_window = time.perf_counter()
            if run.iteration % t.checkpoint_interval == 0 or run.iteration == t.max_iters:
                run.save(f"iter_{run.iteration}.pt")
        if record is None:  # resumed a finished run: report its final state again
            record = run.evaluate(log)
    finally:
        log.close()
        cleanup()
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
        record = train(cfg, work_dir, args.resume)
    except (DataError, ckpt.CheckpointWriteError) as err:  # a named file, not a code path
        print(f"error: {err}", file=sys.stderr)
        return 1
    if record is not None:
        print(f"target mIoU: {record['mIoU']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
