"""Seed statistics of one config: ``python -m fastuda.report WORK_DIR... [--json FILE]``.

Published UDA numbers are means over seeds (3 for DAFormer, SePiCo, HRDA): one seed is not a
result. For runs of one config that differ only in ``train.seed`` this reads each work dir's
``config.toml`` and ``metrics.jsonl``, takes the evaluation at one iteration (``--iter``; by
default the last iteration every run evaluated), and reports mean, standard deviation (n - 1
denominator) and median over the runs of mIoU, of the subset means (mIoU16/mIoU13 for SYNTHIA)
and of every class's IoU, and names the median-seed run and its checkpoint (the run whose mIoU is
the median; with an even number of runs the lower of the two middle ones). A Markdown table goes to
the screen, the same numbers as JSON to ``--json`` (default ``report.json``).

Runs whose configs differ in more than the seed (and settings that do not change results:
data.num_workers, train.log_interval, train.checkpoint_interval, train.keep_checkpoints,
train.device) are refused, naming the key.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

# settings two runs of "one config" may differ in: none changes the numbers
NEUTRAL_KEYS = frozenset({"train.seed", "data.num_workers", "train.log_interval",
                          "train.checkpoint_interval", "train.keep_checkpoints", "train.device"})


class ReportError(RuntimeError):
    """A work dir cannot be read or the runs do not belong together; the message names it."""


@dataclass
class Run:
    work_dir: Path
    config: dict[str, Any]
    evals: dict[int, dict[str, Any]]  # iteration -> evaluation record (the last one written)

    @property
    def seed(self) -> int:
        return int(self.config.get("train", {}).get("seed", 0))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.endswith("label_map"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_run(work_dir: str | Path) -> Run:
    wd = Path(work_dir)
    cfg_path, metrics_path = wd / "config.toml", wd / "metrics.jsonl"
    for path in (cfg_path, metrics_path):
        if not path.is_file():
            raise ReportError(f"{path}: not found (is {wd} a fastuda work dir?)")
    try:
        config = tomllib.loads(cfg_path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ReportError(f"{cfg_path}: not valid TOML: {err}") from None
    evals: dict[int, dict[str, Any]] = {}
    lines = metrics_path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves a cut-off last line; anything else is corrupt
            if n == len(lines):
                continue
            raise ReportError(f"{metrics_path}:{n}: not a JSON line") from None
        if record.get("type") == "eval" and "mIoU" in record:
            evals[int(record["iter"])] = record  # a resumed run may evaluate again: last wins
    if not evals:
        raise ReportError(f"{metrics_path}: no evaluation records")
    return Run(wd, config, evals)


def check_one_config(runs: list[Run]) -> None:
    first = _flatten(runs[0].config)
    for run in runs[1:]:
        other = _flatten(run.config)
        for key in sorted(set(first) | set(other)):
            if key in NEUTRAL_KEYS:
                continue
            if first.get(key) != other.get(key):
                raise ReportError(f"{run.work_dir} is not a run of the config of "
                                  f"{runs[0].work_dir}: {key} = {other.get(key)!r} there, "
                                  f"{first.get(key)!r} here")
    seen: dict[int, Path] = {}
    for run in runs:
        if run.seed in seen:
            raise ReportError(f"{seen[run.seed]} and {run.work_dir} both have train.seed = "
                              f"{run.seed}: the statistics need runs of different seeds")
        seen[run.seed] = run.work_dir


def stats(values: list[float]) -> dict[str, float | int | None]:
    """mean, sample standard deviation (n - 1; None for one value), median, n."""
    if not values:
        return {"mean": None, "std": None, "median": None, "n": 0}
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
            "median": round(statistics.median(values), 4), "n": len(values)}


def checkpoint_of(run: Run, iteration: int) -> str | None:
    """The run's checkpoint of ``iteration``: iter_N.pt, or latest.pt when N is the last
    evaluation and no snapshot was kept; None when neither is there."""
    folder = run.work_dir / "checkpoints"
    snapshot = folder / f"iter_{iteration}.pt"
    if snapshot.is_file():
        return str(snapshot)
    if iteration == max(run.evals) and (folder / "latest.pt").is_file():
        return str(folder / "latest.pt")
    return None


def build_report(runs: list[Run], iteration: int | None = None) -> dict[str, Any]:
    if not runs:
        raise ReportError("no work dirs given")
    check_one_config(runs)
    common = set.intersection(*(set(r.evals) for r in runs))
    if iteration is None:
        if not common:
            raise ReportError("no iteration was evaluated in every run: " + "; ".join(
                f"{r.work_dir}: {sorted(r.evals)}" for r in runs))
        iteration = max(common)
    elif iteration not in common:
        missing = [str(r.work_dir) for r in runs if iteration not in r.evals]
        raise ReportError(f"--iter {iteration}: not evaluated in {', '.join(missing)}")
    records = [r.evals[iteration] for r in runs]
    subset_keys = [k for k in records[0] if k.startswith("mIoU") and k != "mIoU"]
    classes = list(records[0].get("IoU", {}))
    report: dict[str, Any] = {
        "iter": iteration,
        "runs": [{"work_dir": str(r.work_dir), "seed": r.seed, "mIoU": rec["mIoU"],
                  **{k: rec.get(k) for k in subset_keys}, "IoU": rec.get("IoU", {}),
                  "checkpoint": checkpoint_of(r, iteration)} for r, rec in zip(runs, records,
                                                                                strict=True)],
        "mIoU": stats([float(rec["mIoU"]) for rec in records]),
    }
    for key in subset_keys:
        report[key] = stats([float(rec[key]) for rec in records if rec.get(key) is not None])
    # a class without an IoU in a run (never labelled nor predicted) is left out for that run
    report["IoU"] = {c: stats([float(rec["IoU"][c]) for rec in records
                               if rec.get("IoU", {}).get(c) is not None]) for c in classes}
    order = sorted(range(len(runs)), key=lambda i: (float(records[i]["mIoU"]), runs[i].seed))
    report["median_run"] = report["runs"][order[(len(runs) - 1) // 2]]
    return report


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def format_report(report: dict[str, Any]) -> str:
    runs = report["runs"]
    seeds = [f"seed {r['seed']}" for r in runs]
    lines = [f"{len(runs)} run(s), evaluation at iteration {report['iter']}", "",
             "| | mean | std | median | " + " | ".join(seeds) + " |",
             "|---|" + "---:|" * (3 + len(runs))]

    def row(name: str, st: dict[str, Any], per_run: list[float | None]) -> None:
        cells = [_fmt(st["mean"]), _fmt(st["std"]), _fmt(st["median"]), *map(_fmt, per_run)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    for key in [k for k in report if k.startswith("mIoU")]:
        row(f"**{key}**", report[key], [r.get(key) for r in runs])
    for cls, st in report["IoU"].items():
        row(cls, st, [r["IoU"].get(cls) for r in runs])
    med = report["median_run"]
    lines += ["", f"median-seed run: {med['work_dir']} (seed {med['seed']}, mIoU "
                  f"{_fmt(med['mIoU'])}); checkpoint: "
                  f"{med['checkpoint'] or 'none kept for this iteration'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastuda.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dirs", nargs="+", metavar="WORK_DIR")
    parser.add_argument("--iter", type=int, help="the iteration to compare (default: the last "
                                                 "one every run evaluated)")
    parser.add_argument("--json", default="report.json", metavar="FILE",
                        help="where the JSON goes (default: report.json)")
    args = parser.parse_args(argv)
    try:
        report = build_report([read_run(wd) for wd in args.work_dirs], args.iter)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: cannot write {args.json}: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
