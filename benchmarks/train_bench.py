"""End-to-end benchmark: full SePiCo self-training steps with three formulations of the method's
statistics and contrast losses.

    python benchmarks/train_bench.py [--device auto|cpu|cuda] [--settings demo,deeplabv2,daformer]
                                     [--modes published,torch,auto] [--precisions fp32,bf16]
                                     [--warmup 1] [--iters 3]
                                     [--sweep] [--out bench_results/train_bench.json]
                                     [--plot bench_results/train_cost.png] [--data-root DIR]

Modes:
  published  the formulation of the published SePiCo code, run inside fastuda's step: the running
             estimator updated through expanded N x C x D tensors and the losses built from
             boolean-mask gathers (``benchmarks/sepico_style.py``); other ops (label
             downscaling) use the reference backend
  torch      fastuda's lean formulation in plain PyTorch (``ops.backend = "torch"``)
  auto       fastuda's kernels (``ops.backend = "auto"``: C++ on CPU, CUDA/Triton on GPU)

Precisions (``train.precision``, default fp32): fp32, bf16 (autocast), fp16.

Settings (synthetic pair, resized so the crops fit; model weights random, which changes no cost):
  demo       configs/demo.toml as shipped (DeepLab-V2/ResNet-18, 128x128, batch 2, D = 128)
  deeplabv2  configs/sepico/deeplabv2_dist_gta2cs.toml at its 512x512 crop, D = 512;
             ResNet-18 and batch 1 on CPU, ResNet-101 and batch 2 on GPU
  daformer   configs/sepico/daformer_dist_gta2cs.toml at its 512x512 crop, D = 256;
             MiT-B0 and batch 1 on CPU, MiT-B5 and batch 2 on GPU
The pseudo-label threshold is lowered to 0.01: a random-weight teacher is never confident, and
with the published 0.968 the target contrast would see no pixel at all (a trained teacher's
pseudo-labels do enter it). Every (setting, mode) runs in a fresh process: batches are loaded
before timing (data loading is benchmarks/data_bench.py's business), the steps start at the
method's start_iter (every loss active; the warm-up steps fill the statistics), and a step's time
is its wall time (on CUDA synchronised): the table shows the fastest timed step (the median and
every step are in the JSON), "method ms" the fastest step's statistics update + contrast losses
(forward; their backward is inside the network's backward). Peak memory: CUDA
``max_memory_allocated`` over the timed steps; CPU the worker's peak resident set. ``--sweep``
times the demo model over crop sizes and embedding widths and plots how the step and the method's
own stages (statistics + contrast losses, forward) grow; matplotlib is needed for the PNG only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import sepico_style  # noqa: E402
from fastuda.config import Config, load_config  # noqa: E402
from fastuda.engine.profiling import StageTimer  # noqa: E402
from fastuda.methods.sepico import SePiCo  # noqa: E402
from fastuda.models import outputs as O  # noqa: E402
from fastuda.ops.stats import ClassStats  # noqa: E402

MODES = ("published", "torch", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")
SETTINGS = ("demo", "deeplabv2", "daformer")
METHOD_STAGES = ("statistics", "method_losses")


# ----------------------------------------------------------------------------------------------
# The published formulation as a method
# ----------------------------------------------------------------------------------------------
class PublishedSePiCo(SePiCo):
    """SePiCo with the published code's estimator update and losses
    (``benchmarks/sepico_style.py``) in place of fastuda's ops. Same hooks, same state object,
    same regulariser; single process (like the published estimator, it pools only this
    process's pixels)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.settings.variant == "bank":
            raise ValueError("train_bench: the published formulation is benchmarked for the proto "
                             "and dist variants (the bank push is the same ring buffer)")

    @torch.no_grad()
    def update_state(self, teacher_source: dict, source_label: torch.Tensor, it: int) -> None:
        emb = teacher_source[O.EMBEDDINGS].float()
        labels = self._labels_at(source_label, emb)
        count, mean, m2 = self.stats.stats()
        new = sepico_style.estimator_update(
            ClassStats(count.float(), mean.float(), m2.float()), emb, labels, self.num_classes,
            self.ignore_index)
        state = self.stats.state_dict()
        state.update(count=new.count, mean=new.mean, m2=new.m2)
        self.stats.load_state_dict(state)

    def _contrast(self, emb: torch.Tensor, labels: torch.Tensor, tag: str) -> dict:
        emb = emb.float()
        lbl = self._labels_at(labels, emb)
        cfg, stats = self.settings, self.stats
        if not bool((lbl != self.ignore_index).any()):  # as fastuda's ops: 0, not NaN
            loss = emb.sum() * 0.0
        elif cfg.variant == "proto":
            loss = sepico_style.proto_contrast(emb, lbl, stats.mean, tau=cfg.tau,
                                                         ignore_index=self.ignore_index)
        else:
            loss = sepico_style.dist_contrast(emb, lbl, stats.mean, stats.var,
                                                        tau=cfg.tau, lam=cfg.lam,
                                                        ignore_index=self.ignore_index)
        losses = {f"{tag}.contrast": cfg.contrast_weight * loss}
        if cfg.reg_weight > 0:
            losses[f"{tag}.reg"] = cfg.reg_weight * self._regulariser(emb, lbl)
        return losses


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------
def data_overrides(root: str, source_resize: list[int] | None, target_resize: list[int]
                   ) -> list[str]:
    sets = ["data.num_workers=0", "data.rcs_min_pixels=10", "eval.mode='whole'"]
    for dom, name, split, resize in (("source", "synthetic_source", "train", source_resize),
                                     ("target", "synthetic_target", "train", target_resize),
                                     ("val", "synthetic_target", "val", None)):
        sets += [f"data.{dom}.name={name!r}", f"data.{dom}.root={root!r}",
                 f"data.{dom}.resize={list(resize or [])}", f"data.{dom}.split={split!r}"]
    return sets


def setting_config(setting: str, mode: str, device: str, root: str,
                   crop: int | None = None, embed_dim: int | None = None,
                   batch_size: int | None = None, precision: str = "fp32") -> Config:
    gpu = device == "cuda"
    if setting == "demo":
        path = ROOT / "configs" / "demo.toml"
        sets = data_overrides(root, None, [256, 128])
        if crop is not None:  # sweep: whole images large enough for the crop
            sets = data_overrides(root, [2 * crop, crop], [2 * crop, crop])
            sets.append(f"data.crop_size=[{crop}, {crop}]")
        if embed_dim is not None:
            sets.append(f"model.embed_dim={embed_dim}")
    elif setting in ("deeplabv2", "daformer"):
        path = ROOT / "configs" / "sepico" / f"{setting}_dist_gta2cs.toml"
        sets = data_overrides(root, [1024, 512], [1024, 512]) + ["data.crop_size=[512, 512]"]
        backbone = {"deeplabv2": ("resnet18", "resnet101"),
                    "daformer": ("mit_b0", "mit_b5")}[setting][gpu]
        sets += [f"model.backbone={backbone!r}", f"data.batch_size={2 if gpu else 1}",
                 "model.pretrained=''"]
    else:
        raise ValueError(f"unknown setting {setting!r} (choose from {SETTINGS})")
    # a random-weight teacher is never confident: with the published threshold no target pixel
    # would enter the target contrast, which a trained teacher's pseudo-labels do
    sets.append("self_training.pseudo_threshold=0.01")
    sets.append(f"ops.backend={'auto' if mode == 'auto' else 'torch'!r}")
    sets.append(f"train.device={device!r}")
    sets.append(f"train.precision={precision!r}")
    if batch_size is not None:
        sets.append(f"data.batch_size={batch_size}")
    return load_config(path, sets)


# ----------------------------------------------------------------------------------------------
# Measuring (inside a worker process)
# ----------------------------------------------------------------------------------------------
def measure(cfg: Config, mode: str, warmup: int, iters: int) -> dict[str, Any]:
    from fastuda.engine.distributed import DistInfo
    from fastuda.engine.runtime import pick_device, seed_everything
    from fastuda.train import Run

    device = pick_device(cfg.train.device)
    start = cfg.settings("sepico").start_iter
    cfg = replace(cfg, train=replace(cfg.train, max_iters=start + warmup + iters + 1))
    seed_everything(cfg.train.seed, False)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as work_dir:
        run = Run(cfg, Path(work_dir), DistInfo(), device)
        trainer = run.trainer
        if mode == "published":
            ctx = replace(trainer.ctx, backend="torch")
            published = PublishedSePiCo(cfg.settings("sepico"), ctx).to(device)
            trainer.methods.methods["sepico"] = published
        batches = [(next(run.source), next(run.target)) for _ in range(warmup + iters)]
        timer = StageTimer(enabled=True, device=device)
        trainer.timer = timer
        it = start
        for source, target in batches[:warmup]:
            trainer.step(source, target, it)
            it += 1
        timer.reset()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times, method_times = [], []
        for source, target in batches[warmup:]:
            before = sum(timer.totals.get(s, 0.0) for s in METHOD_STAGES)
            t0 = time.perf_counter()
            result = trainer.step(source, target, it)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            method_times.append(sum(timer.totals.get(s, 0.0) for s in METHOD_STAGES) - before)
            it += 1
            if not result.finite:
                raise RuntimeError(f"non-finite loss at iteration {it - 1}: {result.losses}")
        if device.type == "cuda":
            memory = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            import resource
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stages = {k: 1e3 * v / iters for k, v in timer.totals.items()}
    # the fastest step: on a shared machine the others mostly measure who else was running
    ms = 1e3 * min(times)
    return {"mode": mode, "model": f"{cfg.model.name}/{cfg.model.backbone}",
            "precision": cfg.train.precision,
            "crop": cfg.data.crop_size[0], "batch_size": cfg.data.batch_size,
            "embed_dim": trainer.methods["sepico"].stats.dim, "ms_per_step": ms,
            "ms_per_step_median": 1e3 * statistics.median(times),
            "ms_per_step_all": [1e3 * t for t in times],
            "images_per_s": 2 * cfg.data.batch_size * 1e3 / ms,
            "method_ms": 1e3 * min(method_times),
            "stages_ms": stages, "peak_memory_mib": memory,
            "memory_kind": "cuda max_memory_allocated" if device.type == "cuda"
            else "process peak RSS"}


def worker(job: dict[str, Any]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    rows = []
    for mode in job["modes"]:
        cfg = setting_config(job["setting"], mode, job["device"], job["root"],
                             crop=job.get("crop"), embed_dim=job.get("embed_dim"),
                             batch_size=job.get("batch_size"),
                             precision=job.get("precision", "fp32"))
        row = measure(cfg, mode, job["warmup"], job["iters"])
        row["setting"] = job["setting"]
        rows.append(row)
    return rows


def run_worker(job: dict[str, Any], timeout: int) -> list[dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {job} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def environment(device: str) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "platform": platform.platform()}
    try:
        env["cpu"] = next(line.split(":", 1)[1].strip() for line in
                          Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name"))
    except (OSError, StopIteration):
        env["cpu"] = platform.processor()
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        env["load_average"] = os.getloadavg()
    except OSError:
        pass
    return env


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'setting':<10}{'model':<22}{'crop':>5}{'B':>3}{'D':>5}  {'prec':<5}{'mode':<10}"
            f"{'ms/step':>10}{'img/s':>8}{'method ms':>11}{'peak MiB':>10}{'vs published':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        base = next((x for x in rows if x["setting"] == r["setting"]
                     and x["mode"] == "published" and x["crop"] == r["crop"]
                     and x["embed_dim"] == r["embed_dim"]
                     and x.get("precision") == r.get("precision")), None)
        speed = f"{base['ms_per_step'] / r['ms_per_step']:.2f}x" if base else "-"
        lines.append(f"{r['setting']:<10}{r['model']:<22}{r['crop']:>5}{r['batch_size']:>3}"
                     f"{r['embed_dim']:>5}  {r.get('precision', 'fp32'):<5}{r['mode']:<10}"
                     f"{r['ms_per_step']:>10.0f}"
                     f"{r['images_per_s']:>8.2f}{r['method_ms']:>11.1f}"
                     f"{r['peak_memory_mib']:>10.0f}{speed:>14}")
    return "\n".join(lines)


def plot_sweep(sweep: dict[str, list[dict[str, Any]]], path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, rows) in zip(axes, sweep.items(), strict=True):
        xkey = "crop" if key == "crop" else "embed_dim"
        for mode, colour in zip(MODES, ("tab:red", "tab:blue", "tab:green"), strict=True):
            mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r[xkey])
            if not mine:
                continue
            xs = [r[xkey] for r in mine]
            ax.plot(xs, [r["ms_per_step"] for r in mine], "o-", color=colour,
                    label=f"{mode}: step")
            ax.plot(xs, [r["method_ms"] for r in mine], "s--", color=colour,
                    label=f"{mode}: statistics + contrast (fwd)")
        ax.set_xlabel("crop size (pixels per side)" if key == "crop" else "embedding width D")
        ax.set_ylabel("ms per step")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r[xkey] for r in rows}))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--precisions", default="fp32", help=f"comma-separated, of {PRECISIONS}")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--sweep", action="store_true", help="crop-size and D sweep of the demo model")
    p.add_argument("--sweep-crops", default=None, help="comma-separated (default by device)")
    p.add_argument("--sweep-dims", default=None, help="comma-separated (default by device)")
    p.add_argument("--data-root", default=str(ROOT / "data" / "synthetic"))
    p.add_argument("--timeout", type=int, default=3600, help="seconds per worker process")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "train_bench.json"))
    p.add_argument("--plot", default=str(ROOT / "bench_results" / "train_cost.png"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    modes = [m for m in args.modes.split(",") if m]
    settings = [s for s in args.settings.split(",") if s]
    precisions = [x for x in args.precisions.split(",") if x]
    bad = ([m for m in modes if m not in MODES] + [s for s in settings if s not in SETTINGS]
           + [x for x in precisions if x not in PRECISIONS])
    if bad or not modes or not settings or not precisions:
        p.error(f"unknown or empty mode/setting/precision {bad} (modes {MODES}, settings "
                f"{SETTINGS}, precisions {PRECISIONS})")
    from fastuda.data import ensure_synthetic
    ensure_synthetic(args.data_root)

    base = {"device": device, "root": args.data_root, "warmup": args.warmup,
            "iters": args.iters}
    rows: list[dict[str, Any]] = []
    for setting in settings:
        for precision in precisions:
            for mode in modes:
                rows += run_worker({**base, "setting": setting, "modes": [mode],
                                    "precision": precision}, args.timeout)
                print(format_table(rows).splitlines()[-1], flush=True)
    env = environment(device)
    result: dict[str, Any] = {"environment": env, "device": device, "results": rows}
    print()
    print(format_table(rows))

    if args.sweep:
        crops = [int(x) for x in (args.sweep_crops or ("128,256,384,512" if device == "cuda"
                                                        else "64,128,192,256")).split(",")]
        dims = [int(x) for x in (args.sweep_dims or ("64,128,256,512,1024" if device == "cuda"
                                                     else "32,64,128,256")).split(",")]
        mid_crop = crops[len(crops) // 2]
        sweep: dict[str, list[dict[str, Any]]] = {"crop": [], "dim": []}
        for crop in crops:
            sweep["crop"] += run_worker({**base, "setting": "demo", "modes": modes,
                                         "crop": crop, "embed_dim": 128}, args.timeout)
        for dim in dims:
            sweep["dim"] += run_worker({**base, "setting": "demo", "modes": modes,
                                        "crop": mid_crop, "embed_dim": dim}, args.timeout)
        result["sweep"] = sweep
        print("\ncrop sweep (D = 128):\n" + format_table(sweep["crop"]))
        print(f"\nD sweep (crop {mid_crop}):\n" + format_table(sweep["dim"]))
        where = env.get("gpu", env["cpu"])
        title = (f"SePiCo DistCL step, DeepLab-V2/ResNet-18, batch 2 ({where}); left: D = 128, "
                 f"right: crop {mid_crop}")
        if plot_sweep(sweep, Path(args.plot), title):
            print(f"plot: {args.plot}")
            result["plot"] = args.plot
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
