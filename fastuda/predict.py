"""Prediction on images nobody labelled:
``python -m fastuda.predict CONFIG --checkpoint PATH --input PATH... --output DIR [--set ...]``.

Inputs are image files, folders (searched recursively for .png/.jpg/.jpeg) or text files (.txt)
listing one path per line (relative paths are relative to the list's folder; blank lines and
lines starting with # are skipped): 8-bit RGB, RGBA, greyscale or palette PNG/JPEG of any size.
The inference is evaluate's (``fastuda.evaluate.predict``: ``eval.mode`` whole or slide,
``eval.flip``, HRDA's multi-resolution inference when ``hrda.enabled``), batched over images of
the same size, under the autocast ``train.precision`` asks for.

Outputs mirror the tree below each input folder (a file named directly lands at the top):

- ``--format default``: ``<name>_trainIds.png`` (uint8 train ids), ``<name>_color.png``
  (Cityscapes palette), ``<name>_overlay.jpg`` (the image blended with the colours at
  ``--opacity``), with ``--confidence`` ``<name>_confidence.png`` (max class probability x 65535,
  uint16) and with ``--logits`` ``<name>_logits.npy`` (float16 [C, H, W]: log of the class
  probabilities, flip- and window-averaged as the prediction is; its softmax gives them back);
- ``--format cityscapes``: ``<name>.png`` with Cityscapes label ids (the test server matches
  ``<city>_<seq>_<frame>*.png``, so keep the ``*_leftImg8bit`` names);
- ``--format darkzurich`` (Dark Zurich and ACDC servers): ``labelTrainIds/<name>.png``,
  ``confidence/<name>.png`` (uint16 as above) and ``labelTrainIds_invalid/<name>.png`` (train ids,
  255 where the confidence is below ``--invalid-below``), flat folders: zip the three.

A file that cannot be used (unreadable, empty, not a PNG/JPEG, 16-bit, CMYK) gets one ``error:``
line naming it and is skipped (``--strict``: the run stops there); the exit code is 1 if any was.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .config import Config, ConfigError, load_cli_config
from .data.classes import CITYSCAPES_ID_TO_TRAIN, IGNORE_INDEX, PALETTE
from .data.io import DataError, _load, _open
from .engine.vis import colorize, overlay

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LIST_SUFFIXES = (".txt",)
FORMATS = ("default", "cityscapes", "darkzurich")
DARK_ZURICH_FOLDERS = ("labelTrainIds", "confidence", "labelTrainIds_invalid")
# 8-bit modes Pillow decodes PNG/JPEG to: RGB(A), greyscale (+alpha), palette (+alpha)
EIGHT_BIT_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA")
CONFIDENCE_SCALE = 65535  # uint16 confidence PNGs: probability x 65535, as the servers read them


class PredictError(RuntimeError):
    """Bad arguments found before any image is predicted; the message names the problem."""


@dataclass(frozen=True)
class InputImage:
    path: Path
    name: Path  # output name relative to the output folder, without suffix (mirrors the input)


def train_to_label_ids(num_classes: int) -> np.ndarray:
    """uint8[256]: train id -> Cityscapes label id (255, the ignore value, stays 255)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN.items():
        if train_id < num_classes:
            lut[train_id] = label_id
    return lut


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def _images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


def collect_inputs(paths: list[str | Path]) -> tuple[list[InputImage], list[Path]]:
    """(images with their output names, the input folders). Files named in a list that do not
    exist are kept: they fail, named, when checked. Raises PredictError for a missing --input."""
    items: list[InputImage] = []
    folders: list[Path] = []

    def add_folder(folder: Path) -> None:
        folders.append(folder)
        for p in _images_below(folder):
            items.append(InputImage(p, p.relative_to(folder).with_suffix("")))

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            add_folder(path)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            for line in path.read_text().splitlines():
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                listed = Path(entry) if Path(entry).is_absolute() else path.parent / entry
                if listed.is_dir():
                    add_folder(listed)
                else:
                    items.append(InputImage(listed, Path(listed.stem)))
        elif path.exists():
            items.append(InputImage(path, Path(path.stem)))
        else:
            raise PredictError(f"--input {path}: no such file or folder")
    return items, folders


def check_image(path: Path) -> tuple[int, int]:
    """(height, width) of a usable input image, from its header; DataError names the problem."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as err:
        raise DataError(path, f"cannot read: {err.strerror or err}") from None
    if size == 0:
        raise DataError(path, "empty file (0 bytes)")
    with _open(path) as im:
        if im.format not in ("PNG", "JPEG"):
            raise DataError(path, f"{im.format} image; PNG or JPEG expected")
        rawmode = im.tile[0].args if im.tile else None
        if im.mode == "CMYK":
            raise DataError(path, "CMYK image; convert it to RGB")
        if im.mode.startswith(("I", "F")) or (isinstance(rawmode, str) and ";16" in rawmode):
            raise DataError(path, f"16-bit image (mode {im.mode}); 8-bit images expected")
        if im.mode not in EIGHT_BIT_MODES:
            raise DataError(path, f"unsupported image mode {im.mode}; 8-bit RGB, RGBA or "
                                  f"greyscale expected")
        return im.height, im.width


def read_input(path: Path) -> np.ndarray:
    """Decode to uint8 [H, W, 3] RGB (alpha dropped, greyscale and palette expanded)."""
    with _open(path) as im:
        _load(im, path)
        return np.array(im.convert("RGB") if im.mode != "RGB" else im)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def output_files(item: InputImage, fmt: str, confidence: bool, logits: bool) -> dict[str, Path]:
    """What is written for one image, relative to the output folder, by kind."""
    n = item.name
    if fmt == "cityscapes":
        return {"label_ids": n.with_name(n.name + ".png")}
    if fmt == "darkzurich":
        return {kind: Path(kind) / (n.name + ".png") for kind in DARK_ZURICH_FOLDERS}
    files = {"trainIds": n.with_name(n.name + "_trainIds.png"),
             "color": n.with_name(n.name + "_color.png"),
             "overlay": n.with_name(n.name + "_overlay.jpg")}
    if confidence:
        files["confidence"] = n.with_name(n.name + "_confidence.png")
    if logits:
        files["logits"] = n.with_name(n.name + "_logits.npy")
    return files


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def confidence_png(conf: np.ndarray) -> np.ndarray:
    """Max class probability in [0, 1] -> uint16 (x 65535, rounded)."""
    return np.rint(np.clip(conf, 0, 1) * CONFIDENCE_SCALE).astype(np.uint16)


def write_outputs(out_dir: Path, files: dict[str, Path], image: np.ndarray, prob: Tensor, *,
                  opacity: float, invalid_below: float, label_ids: np.ndarray) -> None:
    """All of one image's files from its class probabilities [C, H, W]."""
    conf_t, pred_t = prob.max(0)
    pred = pred_t.to(torch.uint8).cpu().numpy()
    conf = conf_t.cpu().numpy()
    for kind, rel in files.items():
        path = out_dir / rel
        if kind in ("trainIds", "labelTrainIds"):
            _save_png(pred, path)
        elif kind == "label_ids":
            _save_png(label_ids[pred], path)
        elif kind == "labelTrainIds_invalid":
            _save_png(np.where(conf < invalid_below, np.uint8(IGNORE_INDEX), pred), path)
        elif kind == "confidence":
            _save_png(confidence_png(conf), path)
        elif kind == "color":
            _save_png(colorize(pred_t, PALETTE), path)
        elif kind == "overlay":
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(overlay(image, colorize(pred_t, PALETTE), opacity)).save(
                path, quality=90)
        elif kind == "logits":
            path.parent.mkdir(parents=True, exist_ok=True)
            # probabilities can round to 0 in fp32: clamp so the log stays finite in fp16
            np.save(path, prob.clamp_min(1e-30).log().to(torch.float16).cpu().numpy())
        else:  # every kind output_files names is handled above
            raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
@dataclass
class Summary:
    predicted: int = 0
    failed: dict[str, str] | None = None
    seconds: float = 0.0


def _refuse_output_inside_inputs(out_dir: Path, folders: list[Path]) -> None:
    out = out_dir.resolve()
    for folder in folders:
        if out == folder.resolve() or out.is_relative_to(folder.resolve()):
            raise PredictError(f"--output {out_dir} is inside the input folder {folder}: its "
                               f"outputs would become inputs; choose a folder outside it")


def _check_names(items: list[InputImage], fmt: str) -> None:
    seen: dict[Path, Path] = {}
    for item in items:
        key = Path(item.name.name) if fmt == "darkzurich" else item.name
        if key in seen:
            raise PredictError(f"{seen[key]} and {item.path} would both be written as {key} in "
                               f"the output folder; rename one or predict them separately")
        seen[key] = item.path


def predict_images(cfg: Config, model: torch.nn.Module, items: list[InputImage], out_dir: Path,
                   *, device: torch.device, fmt: str = "default", batch_size: int = 1,
                   opacity: float = 0.5, confidence: bool = False, logits: bool = False,
                   invalid_below: float = 0.0, overwrite: bool = False, strict: bool = False,
                   report=print) -> Summary:  # noqa: ANN001 - a print-like callable
    """Predict every usable image of ``items`` into ``out_dir``; bad files are reported through
    ``report`` and skipped (``strict``: DataError is raised at the first)."""
    from tqdm import tqdm

    from .data.loaders import normalise
    from .evaluate import autocast_for, predict

    if fmt not in FORMATS:
        raise PredictError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not 0.0 <= opacity <= 1.0:
        raise PredictError(f"--opacity {opacity}: expected a value in [0, 1]")
    num_classes = cfg.model.num_classes
    if num_classes > IGNORE_INDEX:
        raise PredictError(f"model.num_classes = {num_classes} does not fit uint8 label PNGs")
    _check_names(items, fmt)
    files = {item: output_files(item, fmt, confidence, logits) for item in items}
    existing = [out_dir / rel for fs in files.values() for rel in fs.values()
                if (out_dir / rel).exists()]
    if existing and not overwrite:
        raise PredictError(f"{len(existing)} output file(s) already exist in {out_dir} (first: "
                           f"{existing[0]}); pass --overwrite to replace them")

    from .methods.daynight import eval_class_weight

    class_weight = eval_class_weight(cfg)  # SePiCo's Dark Zurich test-time re-weighting
    summary = Summary(failed={})
    failed = summary.failed
    assert failed is not None

    def fail(item: InputImage, err: DataError) -> None:
        if strict:
            raise err
        failed[str(item.path)] = err.problem
        report(f"error: {err} (skipped)")

    # header check of every file before any prediction: bad files are known up front
    sizes: dict[InputImage, tuple[int, int]] = {}
    for item in items:
        try:
            sizes[item] = check_image(item.path)
        except DataError as err:
            fail(item, err)
    # batches of equal-sized images, in input order within each size
    groups: dict[tuple[int, int], list[InputImage]] = {}
    for item, hw in sizes.items():
        groups.setdefault(hw, []).append(item)
    batches = [group[i:i + batch_size] for group in groups.values()
               for i in range(0, len(group), batch_size)]
    label_ids = train_to_label_ids(num_classes)

    def load(batch: list[InputImage]) -> list[tuple[InputImage, np.ndarray | DataError]]:
        out: list[tuple[InputImage, np.ndarray | DataError]] = []
        for item in batch:
            try:
                out.append((item, read_input(item.path)))
            except DataError as err:  # truncated or corrupt past the header
                out.append((item, err))
        return out

    model.eval()
    t0 = time.perf_counter()
    bar = tqdm(total=len(sizes), unit="img", desc="predict", dynamic_ncols=True, disable=None)
    with ThreadPoolExecutor(max_workers=1) as reader:  # decodes the next batch meanwhile
        ahead: Future | None = reader.submit(load, batches[0]) if batches else None
        for k in range(len(batches)):
            assert ahead is not None
            loaded = ahead.result()
            ahead = reader.submit(load, batches[k + 1]) if k + 1 < len(batches) else None
            good = []
            for item, image in loaded:
                if isinstance(image, DataError):
                    bar.update(1)
                    fail(item, image)
                else:
                    good.append((item, image))
            if not good:
                continue
            x = torch.from_numpy(np.stack([im for _, im in good])).permute(0, 3, 1, 2)
            x = normalise(x.to(device), cfg.data.mean, cfg.data.std)
            with autocast_for(cfg, device):
                prob = predict(model, x, cfg.eval, num_classes, class_weight=class_weight)
            if class_weight is not None:  # the re-weighted scores, normalised: same argmax
                prob = prob / prob.sum(1, keepdim=True)
            for b, (item, image) in enumerate(good):
                write_outputs(out_dir, files[item], image, prob[b].float(), opacity=opacity,
                              invalid_below=invalid_below, label_ids=label_ids)
                summary.predicted += 1
            bar.update(len(good))
    bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def main(argv: list[str] | None = None) -> int:
    from .evaluate import checkpoint_parser

    parser = checkpoint_parser("python -m fastuda.predict", __doc__)
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="image files, folders (recursive) or .txt lists of paths")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--format", choices=FORMATS, default="default",
                        help="default: train ids, colours, overlay; cityscapes / darkzurich: "
                             "what those test servers read")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="images per forward pass (default: eval.batch_size)")
    parser.add_argument("--opacity", type=float, default=0.5, help="colour share in the overlay")
    parser.add_argument("--confidence", action="store_true",
                        help="also write <name>_confidence.png (default format)")
    parser.add_argument("--logits", action="store_true",
                        help="also write <name>_logits.npy (default format)")
    parser.add_argument("--invalid-below", type=float, default=0.0, metavar="P",
                        help="darkzurich: pixels with confidence below P are 255 in "
                             "labelTrainIds_invalid (default 0: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad file")
    args = parser.parse_args(argv)
    cfg = load_cli_config(args.config, args.set)
    if cfg is None:
        return 2
    from .engine.checkpoint import CheckpointLoadError
    from .engine.runtime import pick_device
    from .evaluate import load_model

    def report(line: str) -> None:
        from tqdm import tqdm
        tqdm.write(line, file=sys.stderr)

    out_dir = Path(args.output)
    try:
        if args.batch_size < 0:
            raise PredictError(f"--batch-size {args.batch_size}: expected >= 1")
        items, folders = collect_inputs(args.input)
        _refuse_output_inside_inputs(out_dir, folders)
        if not items:
            raise PredictError(f"no .png/.jpg/.jpeg images in {' '.join(args.input)}")
        device = pick_device(cfg.train.device)
        model = load_model(cfg, args.checkpoint, args.weights, device, args.config)
        summary = predict_images(
            cfg, model, items, out_dir, device=device, fmt=args.format,
            batch_size=args.batch_size or cfg.eval.batch_size, opacity=args.opacity,
            confidence=args.confidence, logits=args.logits, invalid_below=args.invalid_below,
            overwrite=args.overwrite, strict=args.strict, report=report)
    except (PredictError, ConfigError, FileNotFoundError, CheckpointLoadError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # an output cannot be written (full disk, no permission)
        print(f"error: cannot write to {out_dir}: {err}", file=sys.stderr)
        return 1
    failed = summary.failed or {}
    rate = summary.predicted / summary.seconds if summary.seconds > 0 else math.inf
    print(f"predicted {summary.predicted} image(s) into {out_dir} in {summary.seconds:.1f} s "
          f"({rate:.2f} images/s); {len(failed)} skipped")
    for path, problem in failed.items():
        print(f"  skipped {path}: {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
