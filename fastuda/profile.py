"""Where a training step's time goes.

    python -m fastuda.profile CONFIG [--iters N] [--warmup W] [--set key=value ...]
                                     [--trace DIR] [--json PATH]

Builds the run the config describes (as ``fastuda.train`` does, under torchrun too), runs W warm-up
steps and then N timed steps from ``--at-iter`` on (default: the method's start_iter, so every loss
is active; the warm-up steps fill the class statistics), and prints per-stage wall time (data wait,
teacher forward, statistics, pseudo-labels, ClassMix, augmentation, student forward, losses,
backward, optimiser, EMA), images/s and peak memory, and next to the wall time the process's CPU
time and the machine's load average: on a shared machine (load above the core count) the wall
times are upper bounds, while the CPU time per step changes less with the load. Then it runs
``--profile-iters`` more steps under ``torch.profiler`` to measure the share of time spent inside
fastuda's kernels (the ``fastuda::*`` ops: statistics, contrast losses, label downscaling,
forward and backward); ``--trace DIR`` writes that profile as a trace for TensorBoard or Perfetto
(ui.perfetto.dev).

On CUDA the stage timer synchronises at every stage boundary (each stage is charged its own
kernels), which costs a little overlap: images/s is measured on the same synchronised steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, load_config
from .engine.distributed import barrier, cleanup, init_distributed
from .engine.profiling import StageTimer

KERNEL_PREFIX = "fastuda::"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastuda.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="TOML config (see configs/)")
    p.add_argument("--iters", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--at-iter", type=int, default=None,
                   help="iteration number of the first step (default: the methods' latest "
                        "start_iter)")
    p.add_argument("--profile-iters", type=int, default=2,
                   help="steps under torch.profiler for the kernel share and --trace (default 2;"
                        " 0 skips)")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="write the torch.profiler trace (TensorBoard / Perfetto) into DIR")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    args = p.parse_args(argv)
    for name in ("iters", "warmup", "profile_iters"):
        if getattr(args, name) < (1 if name == "iters" else 0):
            p.error(f"--{name.replace('_', '-')} must be >= {1 if name == 'iters' else 0}, got "
                    f"{getattr(args, name)}")
    if args.trace and args.profile_iters == 0:
        p.error("--trace needs --profile-iters >= 1")
    return args


def peak_memory(device: torch.device) -> dict[str, float]:
    """CUDA: peak allocated/reserved by torch since the last reset; CPU: the process's peak
    resident set (whole lifetime: model, data, workers' parent side)."""
    if device.type == "cuda":
        return {"peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20}
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def kernel_share(prof: torch.profiler.profile, wall_seconds: float, cuda: bool
                 ) -> dict[str, Any]:
    """Time inside ``fastuda::*`` ops (outermost ones only, so nested calls count once).

    CPU: their CPU time (children included) over the profiled wall time. CUDA: the device time
    of the kernels they launch over all device time."""
    per_op: dict[str, dict[str, float]] = {}
    total_device = 0.0
    for evt in prof.events():
        if cuda:
            total_device += evt.self_device_time_total
        if not evt.name.startswith(KERNEL_PREFIX):
            continue
        parent, nested = evt.cpu_parent, False
        while parent is not None:
            if parent.name.startswith(KERNEL_PREFIX):
                nested = True
                break
            parent = parent.cpu_parent
        if nested:
            continue
        row = per_op.setdefault(evt.name, {"calls": 0, "us": 0.0})
        row["calls"] += 1
        row["us"] += evt.device_time_total if cuda else evt.cpu_time_total
    inside = sum(r["us"] for r in per_op.values())
    denominator = total_device if cuda else wall_seconds * 1e6
    return {"share": inside / denominator if denominator > 0 else 0.0,
            "basis": "device time" if cuda else "wall time",
            "ops": {k: {"calls": int(v["calls"]), "ms": v["us"] / 1e3}
                    for k, v in sorted(per_op.items(), key=lambda kv: -kv[1]["us"])}}


def _default_at_iter(cfg: Config) -> int:
    """The first iteration at which every method's losses run (the latest start_iter)."""
    return max((getattr(cfg.settings(n), "start_iter", 0) for n in cfg.methods), default=0)


def profile(cfg: Config, *, iters: int, warmup: int, at_iter: int | None = None,
            profile_iters: int = 2, trace_dir: str | None = None) -> dict[str, Any] | None:
    """Run the steps and return the report (rank 0; None on other ranks)."""
    from .engine.runtime import pick_device, seed_everything
    from .train import Run

    device = pick_device(cfg.train.device)
    info = init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    start = _default_at_iter(cfg) if at_iter is None else at_iter
    if start < 0:
        raise ConfigError(f"--at-iter must be >= 0, got {start}")
    last = start + warmup + iters + profile_iters
    if last >= cfg.train.max_iters:  # keep the lr schedule inside its range
        cfg = replace(cfg, train=replace(cfg.train, max_iters=last + 1))
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    try:
        with tempfile.TemporaryDirectory(prefix="fastuda-profile-") as work_dir:
            run = Run(cfg, Path(work_dir), info, device)
            run.iteration = start
            timer = StageTimer(enabled=True, device=device)
            run.trainer.timer = timer
            for _ in range(warmup):
                run.step()
            barrier()
            timer.reset()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            load_start = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), time.process_time()
            skipped = sum(not run.step().finite for _ in range(iters))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0  # this process's threads (not the loader workers)
            load_end = os.getloadavg()[0]
            stages = timer.breakdown(wall, iters)
            memory = peak_memory(device)
            kernels = None
            if profile_iters:
                kernels = _profiled_steps(run, profile_iters, device, trace_dir)
    finally:
        cleanup()
    if not info.is_main:
        return None
    images = 2 * cfg.data.batch_size * info.world_size * iters
    return {"config": {"model": f"{cfg.model.name}/{cfg.model.backbone}",
                       "method": "+".join(cfg.methods) or "none",
                       "crop_size": list(cfg.data.crop_size), "batch_size": cfg.data.batch_size,
                       "embed_dim": cfg.model.embed_dim, "precision": cfg.train.precision,
                       "ops_backend": cfg.ops.backend, "loader": cfg.data.loader},
            "device": _device_name(device), "world_size": info.world_size,
            "threads": torch.get_num_threads(), "first_iter": start, "warmup": warmup,
            "iters": iters, "non_finite_steps": skipped, "ms_per_step": 1e3 * wall / iters,
            "cpu_ms_per_step": 1e3 * cpu / iters, "cpu_count": os.cpu_count() or 1,
            "load_average": [load_start, load_end],
            "images_per_s": images / wall, "stages": stages, "memory": memory,
            "kernels": kernels}


def _profiled_steps(run: Any, n: int, device: torch.device, trace_dir: str | None
                    ) -> dict[str, Any]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            run.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    result = kernel_share(prof, wall, device.type == "cuda")
    result["steps"] = n
    if trace_dir is not None:
        out = Path(trace_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"fastuda_rank{run.info.rank}.pt.trace.json"
        prof.export_chrome_trace(str(path))
        result["trace"] = str(path)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return "CPU"


def format_report(report: dict[str, Any]) -> str:
    c = report["config"]
    load = report["load_average"]
    lines = [f"{c['model']}, {c['method']}, crop {c['crop_size'][0]}x{c['crop_size'][1]}, "
             f"batch {c['batch_size']} x {report['world_size']} rank(s), {c['precision']}, "
             f"ops backend {c['ops_backend']}; {report['device']}, {report['threads']} threads",
             f"{report['iters']} steps from iteration {report['first_iter']} after "
             f"{report['warmup']} warm-up steps: {report['ms_per_step']:.1f} ms/step, "
             f"{report['images_per_s']:.2f} images/s (source + target)",
             f"process CPU time {report['cpu_ms_per_step']:.1f} ms/step "
             f"({report['cpu_ms_per_step'] / report['ms_per_step']:.2f} cores busy); 1-minute "
             f"load average {load[0]:.2f} -> {load[1]:.2f} on {report['cpu_count']} CPUs", ""]
    if max(load) > report["cpu_count"]:
        # our own threads count too, so this fires only when the CPUs were oversubscribed
        lines += ["warning: load average above the CPU count: other work shared the CPUs, the "
                  "wall times are upper bounds", ""]
    lines.append(f"{'stage':<36}{'ms/step':>10}{'share':>8}")
    for row in report["stages"]:
        lines.append(f"{row['label']:<36}{row['ms_per_step']:>10.1f}{100 * row['share']:>7.1f}%")
    lines.append("")
    lines.append("peak memory: " + ", ".join(f"{k.removesuffix('_mib').replace('_', ' ')} "
                                             f"{v:.0f} MiB" for k, v in report["memory"].items()))
    if report["non_finite_steps"]:
        lines.append(f"warning: {report['non_finite_steps']} timed steps had a non-finite loss "
                     "(skipped: their backward and optimiser step are missing)")
    k = report["kernels"]
    if k is not None:
        lines.append(f"fastuda kernels: {100 * k['share']:.1f}% of {k['basis']} over "
                     f"{k['steps']} profiled steps")
        for name, row in k["ops"].items():
            lines.append(f"  {name:<40}{row['calls']:>6} calls{row['ms'] / k['steps']:>10.2f} "
                         "ms/step")
        if "trace" in k:
            lines.append(f"trace: {k['trace']} (TensorBoard profiler plugin, or "
                         "ui.perfetto.dev)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        report = profile(cfg, iters=args.iters, warmup=args.warmup, at_iter=args.at_iter,
                         profile_iters=args.profile_iters, trace_dir=args.trace)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report is not None:
        print(format_report(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
