"""Model throughput: forward + backward images/s and peak memory per architecture.

    python benchmarks/model_bench.py                      # CPU small variants; GPU set if present
    python benchmarks/model_bench.py --device cpu --iters 3 --out bench_results/model_bench.json
    python benchmarks/model_bench.py --models vit --batch-size 1 --warmup 1 --iters 2

CPU: DeepLab-V2/ResNet-18 and DAFormer/MiT-B0 at 256x256 (fp32), and every DINOv2 ViT size (VFM-UDA
head) at 112x112 (8 x 8 patches). GPU (when one is visible): the published DeepLab-V2/ResNet-101
and DAFormer/MiT-B5 at 512x512 and 640x640, and every ViT size at the VFM-UDA crop 1024x1024
(padded to 1036), in fp32 and bf16. ``--models`` picks model names (e.g. ``vit``).
One training step is timed: forward in train mode, cross-entropy on the logits plus the mean of the
embeddings, backward (no optimiser step). Each setting runs in a fresh subprocess so peak memory is
its own: on GPU ``max_memory_allocated``, on CPU the peak resident set size (VmHWM, reset through
/proc/self/clear_refs), both minus what was in use once the model and inputs existed, i.e. the
memory of activations, gradients and workspaces. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastuda.config import ModelConfig  # noqa: E402
from fastuda.models import build_model  # noqa: E402

CPU_SETTINGS = [
    {"name": "deeplabv2", "backbone": "resnet18", "size": 256, "precision": "fp32"},
    {"name": "daformer", "backbone": "mit_b0", "size": 256, "precision": "fp32"},
    *({"name": "vit", "backbone": f"dinov2_vit{s}14", "size": 112, "precision": "fp32"}
      for s in "sblg"),
]
GPU_SETTINGS = [
    {"name": name, "backbone": backbone, "size": size, "precision": precision}
    for name, backbone in (("deeplabv2", "resnet101"), ("daformer", "mit_b5"))
    for size in (512, 640) for precision in ("fp32", "bf16")
] + [
    {"name": "vit", "backbone": f"dinov2_vit{s}14", "size": 1024, "precision": precision}
    for s in "sblg" for precision in ("fp32", "bf16")
]


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:  # "5" resets the peak RSS counter (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_setting(setting: dict, device: str, batch_size: int, warmup: int, iters: int,
                channels_last: bool, compile_model: bool) -> dict:
    """Time one setting in this process and return its measurements."""
    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = ModelConfig(name=setting["name"], backbone=setting["backbone"],
                      channels_last=channels_last)
    model = build_model(cfg).to(dev).train()
    step_model = torch.compile(model) if compile_model else model
    size = setting["size"]
    images = torch.randn(batch_size, 3, size, size, device=dev)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    s = model.output_stride
    labels = torch.randint(0, model.num_classes, (batch_size, size // s, size // s), device=dev)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting["precision"]]

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = step_model(images)
            loss = F.cross_entropy(out["logits"].float(), labels)
            if "embeddings" in out:
                loss = loss + out["embeddings"].float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if dev.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        base = _proc_status_kib("VmRSS") * 1024
        rss_reset = _reset_peak_rss()
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    elapsed = time.perf_counter() - start
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
        mem_kind = "cuda max_memory_allocated"
    else:
        peak = _proc_status_kib("VmHWM") * 1024 - base
        mem_kind = "peak RSS" if rss_reset else "peak RSS since process start (reset unavailable)"
    params = sum(p.numel() for p in model.parameters())
    return {**setting, "device": device, "batch_size": batch_size, "iters": iters,
            "channels_last": channels_last, "compile": compile_model,
            "params_m": round(params / 1e6, 2),
            "images_per_s": round(batch_size * iters / elapsed, 3),
            "ms_per_step": round(1000 * elapsed / iters, 2),
            "peak_mem_mb": round(peak / 2**20, 1), "memory": mem_kind}


def run_in_subprocess(setting: dict, args: argparse.Namespace, device: str) -> dict:
    job = {"setting": setting, "device": device, "batch_size": args.batch_size,
           "warmup": args.warmup, "iters": args.iters, "channels_last": args.channels_last,
           "compile_model": args.compile}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**setting, "device": device, "error": " | ".join(tail)}
    return json.loads(lines[-1])


def print_table(rows: list[dict]) -> None:
    header = (f"{'model':<10} {'backbone':<14} {'size':>5} {'prec':>5} {'dev':>5} {'batch':>5} "
              f"{'params M':>9} {'img/s':>9} {'ms/step':>9} {'peak MB':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        head = (f"{r['name']:<10} {r['backbone']:<14} {r['size']:>5} {r['precision']:>5} "
                f"{r['device']:>5}")
        if "error" in r:
            print(f"{head}  failed: {r['error']}")
        else:
            print(f"{head} {r['batch_size']:>5} {r['params_m']:>9.1f} {r['images_per_s']:>9.2f} "
                  f"{r['ms_per_step']:>9.1f} {r['peak_mem_mb']:>9.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU small variants, plus the GPU set when CUDA is visible")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    parser.add_argument("--models", default="",
                        help="comma-separated model names to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "model_bench.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(run_setting(**job)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    plan: list[tuple[dict, str]] = []
    if args.device in ("auto", "cpu"):
        plan += [(s, "cpu") for s in CPU_SETTINGS]
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        plan += [(s, "cuda") for s in GPU_SETTINGS]
    if args.models:
        wanted = set(args.models.split(","))
        unknown = wanted - {s["name"] for s in CPU_SETTINGS + GPU_SETTINGS}
        if unknown:
            parser.error(f"--models: unknown model name(s) {sorted(unknown)}")
        plan = [(s, d) for s, d in plan if s["name"] in wanted]
    rows = []
    for setting, device in plan:
        rows.append(run_in_subprocess(setting, args, device))
        print(f"done: {setting['name']}/{setting['backbone']} {setting['size']} "
              f"{setting['precision']} on {device}", file=sys.stderr)
    print_table(rows)
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
