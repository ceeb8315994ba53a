"""Images per second of the training loaders (PyTorch DataLoader and DALI).

Default workload: PNG images of 1024x512 (the synthetic target domain rendered at that size),
random rescale (0.5, 2.0), 512x512 crops with cat_max_ratio 0.75, flip, normalisation, batch 2,
2 workers. Prints a table and a JSON line (``--json PATH`` also writes it to a file).
``--jitter`` adds, per loader, the same stream with SPCL's source ColorJitter (0.5, 0.5, 0.5,
0.2; ``data.source.color_jitter``), so its cost reads as a ratio within one run.

    python benchmarks/data_bench.py [--images 16] [--batches 20] [--workers 2]
        [--loaders torch dali] [--jitter]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from fastuda.config import DataConfig, DatasetConfig
from fastuda.data.loaders import build_train_iterator, dali_available
from fastuda.data.synthetic import generate_synthetic

SPCL_JITTER = [0.5, 0.5, 0.5, 0.2]  # BinhuiXie/SPCL configs/deeplabv2_r101_cl.yaml#L10-L13


def bench_loader(kind: str, root: Path, args: argparse.Namespace, jitter: bool = False
                 ) -> dict[str, object]:
    # the images read as the source stream: the only one the colour jitter may be set on
    ds_cfg = DatasetConfig(name="synthetic_target", root=str(root),
                           color_jitter=SPCL_JITTER if jitter else [])
    cfg = DataConfig(source=ds_cfg, crop_size=[args.crop, args.crop], batch_size=args.batch,
                     num_workers=args.workers, loader=kind, rcs=False)
    it = build_train_iterator(cfg, ds_cfg, stream=0, seed=0)
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start  # pipeline / worker start-up included
    for _ in range(args.warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
        if batch["image"].is_cuda:
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    it.close()
    images = args.batches * args.batch
    return {"loader": kind, "jitter": jitter,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "images_per_s": images / elapsed, "ms_per_batch": 1000 * elapsed / args.batches,
            "first_batch_s": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loaders", nargs="+", default=["torch", "dali"])
    parser.add_argument("--jitter", action="store_true",
                        help="also each loader with the source ColorJitter (SPCL's)")
    parser.add_argument("--data", default="", help="reuse/generate the images here")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp) / f"bench_{args.width}x{args.height}"
        if not (root / "synthetic.json").is_file():
            generate_synthetic(root, counts={"target": {"train": args.images}}, width=args.width,
                               height=args.height, progress=True)
        results = []
        for kind in args.loaders:
            if kind == "dali" and not dali_available():
                print("dali: not installed, skipped")
                continue
            results.append(bench_loader(kind, root, args))
            if args.jitter:
                results.append(bench_loader(kind, root, args, jitter=True))
    print(f"\n{args.width}x{args.height} PNG -> {args.crop}x{args.crop} crops, batch {args.batch},"
          f" {args.workers} workers, {torch.get_num_threads()} torch threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'loader':<8}{'jitter':<8}{'device':<8}{'images/s':>10}{'ms/batch':>10}"
          f"{'first batch s':>15}")
    for r in results:
        print(f"{r['loader']:<8}{'yes' if r['jitter'] else 'no':<8}{r['device']:<8}"
              f"{r['images_per_s']:>10.1f}{r['ms_per_batch']:>10.1f}{r['first_batch_s']:>15.2f}")
    line = json.dumps({"benchmark": "data", "size": [args.width, args.height],
                       "crop": args.crop, "batch": args.batch, "workers": args.workers,
                       "results": results})
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
