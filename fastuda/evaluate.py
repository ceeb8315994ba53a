"""Evaluation: ``python -m fastuda.evaluate CONFIG --checkpoint PATH [--set key=value ...]``.

Whole-image or sliding-window inference (optional horizontal flip; with ``hrda.enabled`` the
model is the HRDA wrapper, whose eval-mode forward is the multi-resolution inference: context view
of the image or window, detail windows slid over it at full resolution, fused by the attention),
intersections and unions accumulated over the whole split (summed over ranks under DDP), a
per-class table on screen (IoU, precision, recall, pixel shares) and the same JSON record the
training evaluations write to metrics.jsonl. The output folder (``--output``; by default
``WORK_DIR/eval/<checkpoint name>/`` for a checkpoint in ``WORK_DIR/checkpoints/``) receives
``record.json``, ``confusion.json`` (pixel counts, rows ground truth, columns prediction, and the
row-normalised matrix), ``confusion.png`` (its heat map) and ``per_class.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, EvalConfig, load_cli_config
from .engine.metrics import (
    ConfusionMatrix,
    class_table,
    confusion_record,
    format_class_table,
    format_table,
    row_normalised,
)
from .engine.vis import colorize, denormalize, save_confusion_png, save_grid


def _scores(model: nn.Module, images: Tensor, size: tuple[int, int] | None) -> Tensor:
    """Logits upsampled to the image, then (``size``) resized to the label's size: mmseg's
    whole inference with ``rescale`` (SePiCo encoder_decoder_projector.py#L247-L264), two bilinear
    resizes, softmax after."""
    out = model(images)["logits"].float()
    out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
    if size is not None and tuple(size) != tuple(out.shape[-2:]):
        out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
    return out


def _logits(model: nn.Module, images: Tensor, flip: bool,
            size: tuple[int, int] | None = None) -> Tensor:
    prob = _scores(model, images, size).softmax(1)
    if flip:
        prob = 0.5 * (prob + _scores(model, images.flip(-1), size).softmax(1).flip(-1))
    return prob


def _slide_scores(model: nn.Module, images: Tensor, cfg: EvalConfig, num_classes: int,
                  size: tuple[int, int] | None) -> Tensor:
    """mmseg's slide inference (HRDA mmseg/models/segmentors/encoder_decoder.py#L201-L262): the
    windows' logits averaged where they overlap, then (``size``) resized to the label's size."""
    B, _, H, W = images.shape
    ch, cw = cfg.crop_size
    sh, sw = cfg.stride
    rows = max(H - ch + sh - 1, 0) // sh + 1
    cols = max(W - cw + sw - 1, 0) // sw + 1
    scores = images.new_zeros(B, num_classes, H, W, dtype=torch.float32)
    hits = images.new_zeros(1, 1, H, W, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, max(H - ch, 0)), min(c * sw, max(W - cw, 0))
            y2, x2 = min(y1 + ch, H), min(x1 + cw, W)
            scores[:, :, y1:y2, x1:x2] += _scores(model, images[:, :, y1:y2, x1:x2], None)
            hits[:, :, y1:y2, x1:x2] += 1
    scores = scores / hits
    if size is not None and tuple(size) != (H, W):
        scores = F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)
    return scores


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, cfg: EvalConfig, num_classes: int,
            out_size: tuple[int, int] | None = None, class_weight: Tensor | None = None
            ) -> Tensor:
    """Class probabilities [B, C, H, W] at image resolution, or at ``out_size`` (the label's
    size when ``data.val_labels = "original"``): the softmax of the logits (whole image, or the
    windows' average), resized to the label before it, as mmseg's inference; with ``eval.flip``
    the mean of the image's and its mirror's probabilities (mmseg's aug_test).

    ``class_weight`` [C] (SePiCo's Dark Zurich test-time re-weighting,
    fastuda/methods/daynight.py): the probabilities at image resolution times the weights, then
    resized to ``out_size`` (bilinear), as released (encoder_decoder_projector.py#L313-L329):
    class scores, not probabilities."""
    if class_weight is not None:
        prob = predict(model, images, cfg, num_classes)
        prob = prob * class_weight.to(prob)[None, :, None, None]
        if out_size is not None and tuple(out_size) != tuple(prob.shape[-2:]):
            prob = F.interpolate(prob, size=tuple(out_size), mode="bilinear",
                                 align_corners=False)
        return prob
    if cfg.mode == "whole":
        return _logits(model, images, cfg.flip, out_size)
    prob = _slide_scores(model, images, cfg, num_classes, out_size).softmax(1)
    if cfg.flip:
        flipped = _slide_scores(model, images.flip(-1), cfg, num_classes, out_size)
        prob = 0.5 * (prob + flipped.softmax(1).flip(-1))
    return prob


def evaluation_subsets(cfg: Config) -> dict[str, list[int]]:
    """SYNTHIA-trained models also report mIoU over its 16 and 13 classes."""
    if cfg.data.source.name == "synthia":
        from .data.classes import SYNTHIA13, SYNTHIA16
        return {"mIoU16": list(SYNTHIA16), "mIoU13": list(SYNTHIA13)}
    return {}


def class_names(num_classes: int) -> list[str]:
    """The Cityscapes names of train ids 0..num_classes-1 (numbers past the 19 classes)."""
    from .data.classes import CITYSCAPES_CLASSES

    if num_classes <= len(CITYSCAPES_CLASSES):
        return list(CITYSCAPES_CLASSES[:num_classes])
    return [str(i) for i in range(num_classes)]


def autocast_for(cfg: Config, device: torch.device) -> AbstractContextManager:
    """Autocast as ``train.precision`` says (bf16/fp16), or nothing for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def wrap_for_methods(cfg: Config, model: nn.Module) -> nn.Module:
    """``model`` inside the wrappers of the run's methods whose heads change the predictions
    (CorDA's ``wrap_model``), as training built it: its checkpoints hold the wrapper's weights."""
    from .engine.context import MethodContext
    from .methods import METHODS, Method

    for name in cfg.methods:
        cls = METHODS[name]
        if cls.wrap_model is not Method.wrap_model:  # only these need an instance
            ctx = MethodContext(num_classes=cfg.model.num_classes, model=cfg.model)
            model = cls(cfg.settings(name), ctx).wrap_model(model)
    return model


def load_model(cfg: Config, checkpoint: str | Path, weights: str, device: torch.device,
               config_path: str | Path = "the config") -> nn.Module:
    """The network ``cfg`` describes (HRDA-wrapped when enabled) with the ``weights``
    ("student" or "teacher") of a training checkpoint, or a bare state dict, in eval mode.

    Raises FileNotFoundError / CheckpointLoadError naming the file.
    """
    from .engine.checkpoint import CheckpointLoadError, load_checkpoint
    from .models import build_network

    # the checkpoint sets every weight: model.pretrained is not read (a missing file is no error)
    model = wrap_for_methods(cfg, build_network(cfg, load_weights=False))
    state = load_checkpoint(checkpoint)
    # a training checkpoint holds {"trainer": {"student": ..., "teacher": ...}}; a bare state
    # dict of the model is accepted too
    if "trainer" in state:
        if weights not in state["trainer"]:
            raise CheckpointLoadError(f"{checkpoint} holds no {weights} weights (it has "
                                      f"{sorted(state['trainer'])})")
        state = state["trainer"][weights]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing / unexpected keys, shapes of another model
        raise CheckpointLoadError(f"{checkpoint} does not hold weights of the model "
                                  f"{config_path} describes: {err}") from None
    return model.to(device).eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict], cfg: Config, device: torch.device, *,
             teacher: nn.Module | None = None, vis_path: str | Path | None = None,
             autocast: AbstractContextManager | None = None) -> dict:
    """Run ``model`` over the loader; returns {"mIoU", "IoU": {class: IoU}, (mIoU16, mIoU13)}."""
    return evaluate_split(model, loader, cfg, device, teacher=teacher, vis_path=vis_path,
                          autocast=autocast)[0]


@torch.no_grad()
def evaluate_split(model: nn.Module, loader: Iterable[dict], cfg: Config, device: torch.device,
                   *, teacher: nn.Module | None = None, vis_path: str | Path | None = None,
                   autocast: AbstractContextManager | None = None
                   ) -> tuple[dict, ConfusionMatrix]:
    """:func:`evaluate`, also returning the split's confusion matrix."""
    from .data.classes import PALETTE

    num_classes = cfg.model.num_classes
    was_training = model.training
    model.eval()
    # the teacher too (its BatchNorm may run on batch statistics in training,
    # self_training.teacher_norm): validation images must not move its running statistics
    teacher_modes = [m.training for m in teacher.modules()] if teacher is not None else []
    if teacher is not None:
        teacher.eval()
    conf = ConfusionMatrix(num_classes)
    from .methods.daynight import eval_class_weight

    class_weight = eval_class_weight(cfg)  # None unless SePiCo's Dark Zurich variant asks
    vis_rows: list = []
    seen = 0
    for batch in loader:
        if cfg.eval.max_images and seen >= cfg.eval.max_images:
            break
        seen += batch["image"].shape[0]
        images = batch["image"].to(device)
        labels = batch["label"].to(device)
        with autocast or nullcontext():
            # scored at the labels' size: the original files' with data.val_labels = "original"
            prob = predict(model, images, cfg.eval, num_classes, tuple(labels.shape[-2:]),
                           class_weight)
        pred = prob.argmax(1)
        conf.update(pred, labels)
        if vis_path is not None and len(vis_rows) < cfg.eval.num_vis:
            with autocast or nullcontext():
                pseudo = (predict(teacher, images, cfg.eval, num_classes).argmax(1)
                          if teacher is not None else None)
            if labels.shape[-2:] != images.shape[-2:]:  # panels at the image's size
                labels, pred = (F.interpolate(x[:, None].float(), size=images.shape[-2:],
                                              mode="nearest")[:, 0].long()
                                for x in (labels, pred))
            pseudo = pred if pseudo is None else pseudo
            for i in range(min(images.shape[0], cfg.eval.num_vis - len(vis_rows))):
                vis_rows.append([denormalize(images[i], cfg.data.mean, cfg.data.std),
                                 colorize(labels[i], PALETTE), colorize(pseudo[i], PALETTE),
                                 colorize(pred[i], PALETTE)])
    conf.all_reduce()  # summed over the ranks: every rank sees the same total below
    if was_training:
        model.train()
    if teacher is not None:
        for m, mode in zip(teacher.modules(), teacher_modes, strict=True):
            m.training = mode
    if int(conf.matrix.sum()) == 0:  # an mIoU over nothing is not a number to report
        from .data.io import DataError
        raise DataError(cfg.data.val.root, f"the evaluation saw no labelled pixels "
                                           f"({seen} image(s) of {cfg.data.val.name}/"
                                           f"{cfg.data.val.split} on this rank)")
    if vis_path is not None and vis_rows:
        save_grid(vis_path, vis_rows)
    return conf.summary(class_names(num_classes), evaluation_subsets(cfg)), conf


def write_report(out_dir: str | Path, record: dict, conf: ConfusionMatrix,
                 names: list[str]) -> str:
    """Write record.json, confusion.json, confusion.png and per_class.md into ``out_dir``;
    returns the per-class Markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = class_table(conf, names)
    (out / "record.json").write_text(json.dumps({**record, "per_class": table}, indent=1) + "\n")
    (out / "confusion.json").write_text(json.dumps(confusion_record(conf, names)) + "\n")
    save_confusion_png(row_normalised(conf), names, out / "confusion.png")
    text = format_class_table(table)
    (out / "per_class.md").write_text(text + "\n")
    return text


def default_output(checkpoint: str | Path) -> Path:
    """WORK_DIR/eval/<name> for WORK_DIR/checkpoints/<name>.pt, else beside the checkpoint."""
    ckpt = Path(checkpoint)
    base = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return base / "eval" / ckpt.stem


def checkpoint_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The arguments evaluate, predict and export share: the run's config, a checkpoint, which of
    its weights, and ``--set`` overrides (one spelling for all three commands)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML config of the run that trained the checkpoint")
    parser.add_argument("--checkpoint", required=True, help="checkpoint (.pt)")
    parser.add_argument("--weights", choices=("student", "teacher"), default="student",
                        help="the student or the EMA teacher of the checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable), e.g. eval.flip=true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = checkpoint_parser("python -m fastuda.evaluate", __doc__)
    parser.add_argument("--output", metavar="DIR",
                        help="folder for the confusion matrix and per-class table (default: "
                             "WORK_DIR/eval/<checkpoint name>)")
    args = parser.parse_args(argv)
    cfg = load_cli_config(args.config, args.set)
    if cfg is None:
        return 2
    from .data import DataError, build_val_loader
    from .engine.checkpoint import CheckpointLoadError
    from .engine.runtime import pick_device

    device = pick_device(cfg.train.device)
    out_dir = Path(args.output) if args.output else default_output(args.checkpoint)
    try:
        # HRDA-wrapped when enabled: its multi-resolution inference
        model = load_model(cfg, args.checkpoint, args.weights, device, args.config)
        record, conf = evaluate_split(model, build_val_loader(cfg.data), cfg, device,
                                      autocast=autocast_for(cfg, device))
        table = write_report(out_dir, record, conf, class_names(cfg.model.num_classes))
    except (FileNotFoundError, CheckpointLoadError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # the output folder cannot be written
        print(f"error: cannot write the evaluation report to {out_dir}: {err}", file=sys.stderr)
        return 1
    print(table)
    print("\n".join(line for line in format_table(record).splitlines()
                    if line.startswith("mIoU")))
    print(f"confusion matrix, per-class table: {out_dir}")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
