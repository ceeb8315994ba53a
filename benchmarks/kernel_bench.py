"""Kernel benchmark: every fastuda op x every backend on this machine, against the published
formulation (``benchmarks/sepico_style.py``) and the lean PyTorch formulation
(``backend="torch"``).

    python benchmarks/kernel_bench.py [--quick] [--json results.json] [--device cpu|cuda]
                                      [--contend N]

Scales: DAFormer (N = 51200, D = 256) and DeepLab-V2 (N = 12800, D = 512), C = 19, plus a sweep over
N and D. Times are medians of repeated runs (forward + backward for the losses). Extra peak memory
of one run over its inputs: on CPU the growth of the peak resident set, in a fresh process per
case; on CUDA ``max_memory_allocated`` over what was allocated before, in this process (the
counter counts live allocations, so blocks cached by earlier cases do not hide a peak). Speed-ups
are ratios within the same run. Roofline columns: the bytes and flops a case needs at least
(``min_work``) over its time, as a percentage of the device's copy bandwidth and fp32 matmul rate,
measured at the start together with the bf16 matmul rate. For every op and scale the JSON's
"auto" list names the backend ``backend="auto"`` resolves to and the fastest one measured.

``--contend N`` times every fastuda backend a second time with N busy processes beside it (pure
CPU spinners, as data-loader workers sharing the cores in training) and reports the ratio to the
quiet time, next to the fair-share ratio (what the time would be if the kernel got exactly its
share of the cores: (threads + N) / cores when threads = cores): a ratio far above the fair one
means threads wait for a descheduled thread. The load average (``os.getloadavg``) at the start
and the end goes into the JSON, since "quiet" means "nothing started by this benchmark".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import sepico_style  # noqa: E402
from fastuda import ops  # noqa: E402
from fastuda.ops import _backend  # noqa: E402

C = 19
TAU = 0.1


# ----------------------------------------------------------------------------------------------
# Cases: each returns a zero-argument callable that runs the measured work once
# ----------------------------------------------------------------------------------------------
def make_inputs(B: int, D: int, H: int, W: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(B, D, H, W, generator=g), dim=1)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < 0.1] = 255
    mean = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=1)
    var = torch.rand(C, D, generator=g) * 0.01
    bank = torch.nn.functional.normalize(torch.randn(C, 200, D, generator=g), dim=2)
    bank_len = torch.full((C,), 200, dtype=torch.long)
    t = {"feats": feats, "labels": labels, "mean": mean, "var": var, "bank": bank,
         "bank_len": bank_len}
    return {k: v.to(device) for k, v in t.items()}


def _loss_case(fn: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor) -> Callable:
    def run() -> None:
        f = feats.detach().requires_grad_(True)
        fn(f).backward()
    return run


def build_case(op: str, impl: str, x: dict) -> Callable[[], object] | None:
    """``impl``: "published", "lean" (the reference) or a backend name."""
    f, y, mu, var = x["feats"], x["labels"], x["mean"], x["var"]
    backend = "torch" if impl == "lean" else impl
    if op == "estimator_update":
        if impl == "published":
            state = ops.ClassStats(torch.zeros(C, device=f.device), torch.zeros(C, f.shape[1],
                                   device=f.device), torch.zeros(C, f.shape[1], device=f.device))
            return lambda: sepico_style.estimator_update(state, f, y, C)
        est = ops.ClassStatistics(C, f.shape[1], device=f.device, backend=backend)
        return lambda: est.update(f, y)
    if op == "class_stats_full":
        if impl == "published":
            return None
        return lambda: ops.class_stats(f, y, C, cov="full", backend=backend)
    if op == "proto_contrast":
        if impl == "published":
            return _loss_case(lambda t: sepico_style.proto_contrast(t, y, mu, tau=TAU), f)
        return _loss_case(lambda t: ops.proto_contrast(t, y, mu, tau=TAU, backend=backend), f)
    if op == "dist_contrast":
        if impl == "published":
            return _loss_case(lambda t: sepico_style.dist_contrast(t, y, mu, var, tau=TAU), f)
        return _loss_case(lambda t: ops.dist_contrast(t, y, mu, var, tau=TAU, backend=backend), f)
    if op == "bank_contrast":
        b, bl = x["bank"], x["bank_len"]
        if impl == "published":
            return _loss_case(lambda t: sepico_style.bank_contrast(t, y, b, bl, tau=TAU), f)
        return _loss_case(lambda t: ops.bank_contrast(t, y, b, bl, tau=TAU, backend=backend), f)
    if op == "pixel_contrast":
        if impl == "published":  # the published code builds the N x N matrix: that is "lean" here
            return None
        return _loss_case(lambda t: ops.pixel_contrast(t, y, tau=TAU, backend=backend), f)
    if op == "downscale_labels":
        if impl == "published":
            return None
        big = y.repeat_interleave(4, 1).repeat_interleave(4, 2)
        return lambda: ops.downscale_labels(big, 4, num_classes=C, backend=backend)
    raise ValueError(op)


OPS = ("estimator_update", "class_stats_full", "proto_contrast", "dist_contrast", "bank_contrast",
       "pixel_contrast", "downscale_labels")

# (name, B, D, H, W): H*W*B = N
SCALES = {"daformer": (2, 256, 160, 160), "deeplabv2": (2, 512, 80, 80)}
# ops whose published/lean forms are too slow or too large at full scale get a smaller one
SCALE_OVERRIDES = {"class_stats_full": {"daformer": (2, 64, 160, 160),
                                        "deeplabv2": (2, 128, 80, 80)},
                   "pixel_contrast": {"daformer": (2, 256, 65, 65),
                                      "deeplabv2": (2, 512, 33, 33)}}


def time_case(run: Callable[[], object], device: str, reps: int, budget_s: float) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
    run()
    sync()  # warm-up (compiles, allocator)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (time.perf_counter() - start < budget_s or len(times) < 2):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Busy:
    """N processes that spin on the CPU while the ``with`` block runs (started and stopped by
    this process, by their own pids)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Busy:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(self.n)]
        time.sleep(0.3)  # interpreter start-up: spinning before the timing starts
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


def fair_share_ratio(threads: int, cores: int, busy: int) -> float:
    """Time with ``busy`` spinning processes over the quiet time for a kernel that scales
    perfectly over its threads and gets exactly its share of the cores (fair scheduling)."""
    quiet_cores = min(threads, cores)
    busy_cores = cores * threads / (threads + busy) if threads + busy > cores else quiet_cores
    return quiet_cores / min(busy_cores, quiet_cores)


def cuda_extra_peak_mb(run: Callable[[], object]) -> float:
    """Extra peak CUDA memory (MiB) of one (already warmed-up) run over what is allocated now."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def auto_choice(op: str, x: dict) -> str:
    """The backend(s) that ``backend="auto"`` resolves to when one run of the case executes
    (recorded by wrapping the resolver; "+"-joined when forward and backward differ)."""
    seen: list[str] = []
    original = _backend.resolve

    def spy(name: str, backend: str, *args: object, **kwargs: object) -> str:
        got = original(name, backend, *args, **kwargs)
        if backend == "auto":
            seen.append(got)
        return got

    _backend.resolve = spy
    try:
        run = build_case(op, "auto", x)
        if run is not None:
            run()
    finally:
        _backend.resolve = original
    return "+".join(sorted(set(seen))) or "none"


def auto_summary(op: str, scale: str, choice: str, results: dict[str, float]) -> dict:
    """The auto choice against the fastest backend measured for one op and scale ("lean" is the
    torch backend; "published" is not a backend)."""
    timed = {("torch" if k == "lean" else k): v for k, v in results.items() if k != "published"}
    fastest = min(timed, key=timed.get) if timed else None
    auto_ms = timed.get(choice)
    return {"op": op, "scale": scale, "auto": choice, "auto_ms": auto_ms, "fastest": fastest,
            "fastest_ms": timed.get(fastest) if fastest else None,
            "auto_over_fastest": (auto_ms / timed[fastest]) if auto_ms and fastest else None}


def measure_memory(op: str, impl: str, shape: tuple[int, ...], device: str) -> float:
    """Extra peak memory (MB) of one run over its inputs, in a fresh process."""
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {str(Path(__file__).parent)!r});"
            "import kernel_bench as kb; "
            f"print(kb._memory_child({op!r}, {impl!r}, {tuple(shape)!r}, {device!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ))
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def _memory_child(op: str, impl: str, shape: tuple[int, ...], device: str) -> float:
    # warm-up on a tiny input: thread pools and BLAS buffers are set up once per process and
    # are not the op's memory; a tiny run leaves no large freed blocks for the real run to reuse
    warm = build_case(op, impl, make_inputs(shape[0], shape[1], 8, 8, device))
    assert warm is not None
    warm()
    x = make_inputs(*shape, device)
    run = build_case(op, impl, x)
    assert run is not None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # the peak resident set of the run above what is resident before it: reset the peak to the
    # current size (Linux: clear_refs 5), so the inputs' own construction does not hide it
    before = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan")
    run()
    return (_rss_kib("VmHWM") - before) / 1024


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# ----------------------------------------------------------------------------------------------
# Roofline: what each case must move / compute at least, against ceilings measured on the device
# ----------------------------------------------------------------------------------------------
def measure_ceilings(device: str) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write of a 512 MiB fp32 tensor), fp32 matmul rate (GFLOP/s,
    4096^3 on CUDA with TF32 off, 2048^3 on CPU) and bf16 matmul rate (8192^3 on CUDA, 1024^3 on
    CPU) of this device, as medians of a few runs on random data."""
    src = torch.empty(2**27, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = time_case(lambda: dst.copy_(src), device, 5, 10.0)
    src = dst = None  # 1 GiB freed before the matrices
    rates = {}
    for key, dtype, n in (("matmul_gflop_s", torch.float32, 4096 if device == "cuda" else 2048),
                          ("matmul_bf16_gflop_s", torch.bfloat16,
                           8192 if device == "cuda" else 1024)):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 rate is plain fp32
        try:
            mm_s = time_case(lambda a=a, b=b: a @ b, device, 5, 10.0)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        rates[key] = 2 * n**3 / mm_s / 1e9
    return {"copy_gb_s": 2 * 2**27 * 4 / copy_s / 1e9, **rates}


def min_work(op: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(bytes, flops) one run of a case needs at least (fp32 features; int64 labels): the
    features read once per pass (forward, backward) and the feature gradient written once; the
    flops of the products without which the result cannot be formed (forward logits and the
    feature gradient; a kernel that recomputes the logits in its backward does more). The ratios
    to the time give achieved GB/s and GFLOP/s."""
    B, D, H, W = shape
    N = B * H * W
    feat, lbl = 4 * N * D, 8 * N
    if op == "estimator_update":  # two passes (mean, centred squares)
        return 2 * feat + 2 * lbl, 4 * N * D
    if op == "class_stats_full":  # mean pass + Gram pass over the class-sorted pixels
        return 2 * feat + 2 * lbl, 2 * N * D * D
    if op in ("proto_contrast", "dist_contrast"):  # fwd: read f; bwd: read f, write grad
        products = 1 if op == "proto_contrast" else 2  # f.mu (+ f^2.var)
        return 3 * feat + 2 * lbl, 2 * products * 2 * N * C * D
    if op == "bank_contrast":  # C means + M positives per pixel, forward and gradient
        return 3 * feat + 2 * lbl, 2 * 2 * N * (C + 200) * D
    if op == "pixel_contrast":  # the symmetric N x N similarities (half of them), fwd and grad
        return 3 * feat + 2 * lbl, 2 * N * N * D
    if op == "downscale_labels":  # 16 input labels per output cell, one output label
        return 16 * lbl + lbl, 0.0
    raise ValueError(op)


def cpu_vector_flags() -> list[str]:
    """The AVX-family flags of this CPU (Linux /proc/cpuinfo; empty elsewhere): which ISA the
    numbers were taken on."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith("avx"))
    return []


def available_backends(device: str) -> list[str]:
    out = []
    if device == "cpu" and ops.extension_available():
        out.append("cpu")
    if device == "cuda" and ops.cuda_kernels_built():
        out.append("cuda")
    if device == "cuda":
        out.append("triton")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="DAFormer scale only, fewer repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="bench_results/kernel_bench.json")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset")
    p.add_argument("--contend", type=int, default=0, metavar="N",
                   help="also time the fastuda backends with N busy processes beside them")
    args = p.parse_args()
    dev = args.device
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
          f"CPU vector flags: {' '.join(cpu_vector_flags()) or 'unknown'}")
    cores = os.cpu_count() or 1
    fair = fair_share_ratio(torch.get_num_threads(), cores, args.contend)
    if args.contend:
        print(f"--contend {args.contend}: fair-share ratio {fair:.2f} "
              f"({torch.get_num_threads()} threads, {cores} cores)")
    if dev == "cpu" and not torch.cuda.is_available():
        print("no GPU present: CUDA and Triton backends are not measured on this machine")
    ceilings = measure_ceilings(dev)
    print(f"{dev} ceilings: copy {ceilings['copy_gb_s']:.1f} GB/s, fp32 matmul "
          f"{ceilings['matmul_gflop_s']:.0f} GFLOP/s, bf16 matmul "
          f"{ceilings['matmul_bf16_gflop_s']:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    reps, budget = (3, 4.0) if args.quick else (7, 15.0)
    scales = {"daformer": SCALES["daformer"]} if args.quick else SCALES
    impls = ["published", "lean", *available_backends(dev)]
    rows = []
    autos = []
    header = f"{'op':<18} {'scale':<10} {'shape B,D,H,W':<18} {'impl':<10} {'ms':>9} " \
             f"{'x published':>12} {'x lean':>8} {'extra MB':>9} {'%copy':>6} {'%mm':>5}" + \
             (f" {'busy ms':>9} {'x quiet':>7}" if args.contend else "")
    print(header)
    print("-" * len(header))
    for op in args.ops.split(","):
        for scale, shape in scales.items():
            shape = SCALE_OVERRIDES.get(op, {}).get(scale, shape)
            x = make_inputs(*shape, dev)
            results: dict[str, float] = {}
            for impl in impls:
                try:
                    run = build_case(op, impl, x)
                except (ValueError, RuntimeError) as err:  # backend cannot serve this op
                    print(f"{op:<18} {scale:<10} {impl:<10} unavailable: {err}")
                    continue
                if run is None:
                    continue
                try:
                    ms = 1000 * time_case(run, dev, reps, budget)
                except (ValueError, RuntimeError) as err:
                    print(f"{op:<18} {scale:<10} {impl:<10} unavailable: {err}")
                    continue
                results[impl] = ms
                busy_ms = None
                if args.contend and impl not in ("published", "lean"):
                    with Busy(args.contend):
                        busy_ms = 1000 * time_case(run, dev, reps, budget)
                if args.no_memory:
                    mem = float("nan")
                elif dev == "cuda":
                    mem = cuda_extra_peak_mb(run)
                else:
                    mem = measure_memory(op, impl, shape, dev)
                pub, lean = results.get("published"), results.get("lean")
                row = {"op": op, "scale": scale, "shape": list(shape), "impl": impl, "ms": ms,
                       "speedup_vs_published": (pub / ms) if pub else None,
                       "speedup_vs_lean": (lean / ms) if lean else None,
                       "extra_peak_mb": mem,
                       "feature_input_mb": x["feats"].numel() * 4 / 2**20}
                nbytes, flops = min_work(op, shape)
                row["achieved_gb_s"] = nbytes / ms / 1e6
                row["achieved_gflop_s"] = flops / ms / 1e6
                row["pct_of_copy"] = 100 * row["achieved_gb_s"] / ceilings["copy_gb_s"]
                row["pct_of_matmul"] = 100 * row["achieved_gflop_s"] / ceilings["matmul_gflop_s"]
                if busy_ms is not None:
                    row.update(contend=args.contend, contended_ms=busy_ms,
                               contended_ratio=busy_ms / ms, fair_share_ratio=fair)
                rows.append(row)
                sp = f"{row['speedup_vs_published']:.1f}" if pub else "-"
                sl = f"{row['speedup_vs_lean']:.1f}" if lean else "-"
                print(f"{op:<18} {scale:<10} {','.join(map(str, shape)):<18} {impl:<10} "
                      f"{ms:9.2f} {sp:>12} {sl:>8} {mem:9.1f} {row['pct_of_copy']:6.1f} "
                      f"{row['pct_of_matmul']:5.1f}"
                      + (f" {busy_ms:9.2f} {busy_ms / ms:7.2f}" if busy_ms is not None else ""),
                      flush=True)
            if results:
                autos.append(auto_summary(op, scale, auto_choice(op, x), results))
                a = autos[-1]
                ratio = f"{a['auto_over_fastest']:.2f}x" if a["auto_over_fastest"] else "-"
                print(f"{op:<18} {scale:<10} auto picks {a['auto']}, fastest measured "
                      f"{a['fastest']} (auto / fastest {ratio})", flush=True)
            del x
    if not args.quick:
        print("\nsweep (proto_contrast forward+backward, fastest backend vs lean):")
        best = next((b for b in available_backends(dev)), None)
        for (B, D, H, W) in [(1, 64, 64, 64), (2, 64, 128, 128), (2, 256, 64, 64),
                             (2, 256, 128, 128), (2, 256, 160, 160), (2, 512, 80, 80),
                             (2, 1024, 80, 80)]:
            x = make_inputs(B, D, H, W, dev)
            entry = {"op": "sweep_proto_contrast", "shape": [B, D, H, W], "N": B * H * W, "D": D}
            for impl in ("lean", best):
                if impl is None:
                    continue
                run = build_case("proto_contrast", impl, x)
                entry[f"{impl}_ms"] = 1000 * time_case(run, dev, 3, 5.0)
            rows.append(entry)
            print(f"  N={B * H * W:>6} D={D:>4}: " + "  ".join(
                f"{k}={v:.2f}" for k, v in entry.items() if k.endswith("_ms")))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    load_end = os.getloadavg()
    print(f"load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    meta = {"device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "ceilings": ceilings, "loadavg_start": list(load_start), "loadavg_end": list(load_end),
            "contend": args.contend, "cpu_flags": cpu_vector_flags(),
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if dev == "cuda" else None}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "auto": autos}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
