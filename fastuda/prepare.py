"""``python -m fastuda.prepare DATASET ROOT``: one-off preparation of a dataset.

For each split it converts the downloaded labels to train-id PNGs written beside them
(``*_labelTrainIds.png``; GTA5 palette ids, Cityscapes label ids, SYNTHIA 16-bit red-channel ids),
records per-image class pixel counts in ``ROOT/class_stats_<split>.json`` (rare class sampling reads
them), and prints a summary (images, class frequencies). Work runs in parallel worker processes
with a progress bar and is idempotent: files already converted and counted are skipped, so a second
run does nothing. ``DATASET = synthetic`` generates the built-in synthetic pair under ROOT.

Exit status: 0 when every file is fine, 1 when some files are bad (each is listed with its problem;
the others are still prepared), 2 for a wrong layout.
"""

from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from fastuda.config import DatasetConfig
from fastuda.data.classes import CITYSCAPES_CLASSES
from fastuda.data.datasets import SegDataset, build_dataset
from fastuda.data.io import DataError, LabelEncoding, read_image, read_label
from fastuda.data.stats import class_counts, read_class_stats, write_class_stats

DEFAULT_SPLITS = {"gta": ["train"], "synthia": ["train"], "cityscapes": ["train", "val"],
                  "dark_zurich": ["train", "val"]}
SYNTHETIC_DOMAINS = {"source": ("synthetic_source", "source"),
                     "target": ("synthetic_target", "target"),
                     "night": ("synthetic_night", "night")}


def _prepare_one(job: tuple[str, str, str | None, str | None, LabelEncoding, int]
                 ) -> tuple[str, dict[str, Any] | None, str | None, bool]:
    """(relpath, stats entry, error, converted) for one image: convert its label if needed."""
    relpath, image, label_path, prepared, encoding, num_classes = job
    try:
        # decoded in full: a truncated image must not count as prepared (its header is intact)
        h, w = read_image(image).shape[:2]
        assert label_path is not None
        label = read_label(label_path, encoding)
        if label.shape != (h, w):
            raise DataError(label_path, f"label size {label.shape[1]}x{label.shape[0]} differs "
                                        f"from the image size {w}x{h} ({image})")
        converted = False
        if prepared is not None:
            tmp = f"{prepared}.tmp{os.getpid()}"
            Image.fromarray(label).save(tmp, format="PNG")
            os.replace(tmp, prepared)  # a killed run never leaves half a file behind
            converted = True
        return relpath, {"size": [h, w], "counts": class_counts(label, num_classes)}, None, \
            converted
    except DataError as err:
        return relpath, None, str(err), False


def prepare_split(ds: SegDataset, workers: int, force: bool = False) -> dict[str, Any]:
    """Convert and count one split; returns the numbers of the summary."""
    result: dict[str, Any] = {"images": len(ds), "converted": 0, "done_before": 0, "errors": [],
                              "stats": {}}
    if not ds.has_labels:
        return result
    stats: dict[str, dict[str, Any]] = {}
    if ds.stats_path.is_file() and not force:
        try:
            stats = read_class_stats(ds.stats_path)["images"]
        except DataError:
            stats = {}
    jobs = []
    for i, f in enumerate(ds.files):
        rel = ds.relpath(i)
        if f.label is None:
            continue
        needs_conversion = f.raw_label is not None and (force or not f.label_is_train_ids)
        if rel in stats and not needs_conversion:
            result["done_before"] += 1
            continue
        if needs_conversion:  # read the download, write the train ids
            jobs.append((rel, f.image, f.raw_label, f.prepared_label, ds.raw_encoding,
                         ds.num_classes))
        else:
            enc = ds.train_encoding if f.label_is_train_ids else ds.raw_encoding
            jobs.append((rel, f.image, f.label, None, enc, ds.num_classes))
    if jobs:
        desc = f"{ds.name} {ds.split}"
        if workers > 1 and len(jobs) > 1:
            with Pool(min(workers, len(jobs))) as pool:
                outputs = list(tqdm(pool.imap_unordered(_prepare_one, jobs, chunksize=4),
                                    total=len(jobs), desc=desc, unit="img"))
        else:
            outputs = [_prepare_one(j) for j in tqdm(jobs, desc=desc, unit="img")]
        for rel, entry, error, converted in outputs:
            if error is not None:
                result["errors"].append(error)
                stats.pop(rel, None)
                continue
            stats[rel] = entry
            result["converted"] += int(converted)
        write_class_stats(ds.stats_path, stats, ds.num_classes)
    result["stats"] = stats
    return result


def summary(ds: SegDataset, result: dict[str, Any]) -> str:
    lines = [f"{ds.name} [{ds.split}] at {ds.root}: {result['images']} images"]
    if not ds.has_labels:
        lines.append("  no labels in this split (images only)")
        return "\n".join(lines)
    lines.append(f"  labels converted now: {result['converted']}, already prepared: "
                 f"{result['done_before']}, bad files: {len(result['errors'])}")
    lines.append(f"  class statistics: {ds.stats_path}")
    entries = list(result["stats"].values())
    if entries:
        counts = np.array([e["counts"] for e in entries], dtype=np.int64)
        total = counts.sum()
        lines.append(f"  {'class':<15}{'pixels %':>10}{'images':>9}")
        for c, name in enumerate(CITYSCAPES_CLASSES[: ds.num_classes]):
            share = 100.0 * counts[:, c].sum() / max(total, 1)
            lines.append(f"  {name:<15}{share:>10.3f}{int((counts[:, c] > 0).sum()):>9}")
        ignored = sum(e["size"][0] * e["size"][1] for e in entries) - total
        lines.append(f"  {'(ignored)':<15}{100.0 * ignored / max(total + ignored, 1):>10.3f}")
    for err in result["errors"]:
        lines.append(f"  BAD: {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastuda.prepare",
        description="Convert a dataset's labels to train ids and count class pixels per image.")
    parser.add_argument("dataset", choices=[*DEFAULT_SPLITS, "synthetic"])
    parser.add_argument("root", help="the dataset folder as downloaded (see spec/data.md)")
    parser.add_argument("--split", action="append", default=None,
                        help="split(s) to prepare (default: all the dataset has)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--force", action="store_true", help="redo finished files")
    args = parser.parse_args(argv)

    if args.dataset == "synthetic":
        from fastuda.data.synthetic import ensure_synthetic, generate_synthetic

        if args.force:
            generate_synthetic(args.root, workers=args.workers, progress=True)
        else:
            ensure_synthetic(args.root)
        targets = [(name, split) for name, dom in SYNTHETIC_DOMAINS.values()
                   for split in ("train", "val")
                   if (Path(args.root) / dom / "leftImg8bit" / split).is_dir()]
    else:
        targets = [(args.dataset, s) for s in (args.split or DEFAULT_SPLITS[args.dataset])]
    status = 0
    for name, split in targets:
        try:
            ds = build_dataset(DatasetConfig(name=name, root=args.root, split=split),
                               on_error="skip")
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        result = prepare_split(ds, args.workers, args.force and args.dataset != "synthetic")
        print(summary(ds, result))
        if result["errors"]:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
