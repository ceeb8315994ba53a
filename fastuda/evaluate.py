"""Evaluation: ``python -m fastuda.evaluate CONFIG --checkpoint PATH [--set key=value ...]``.

Whole-image or sliding-window inference (optional horizontal flip; with ``hrda.enabled`` the
model is the HRDA wrapper, whose eval-mode forward is the multi-resolution inference: context view
of the image or window, detail windows slid over it at full resolution, fused by the attention),
intersections and unions accumulated over the whole split (summed over ranks under DDP), a
per-class IoU table on screen and the same JSON record the training evaluations write to
metrics.jsonl.
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

from .config import Config, ConfigError, EvalConfig, load_config
from .engine.metrics import ConfusionMatrix, format_table
from .engine.vis import colorize, denormalize, save_grid


def _logits(model: nn.Module, images: Tensor, flip: bool) -> Tensor:
    out = model(images)["logits"].float()
    out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
    prob = out.softmax(1)
    if flip:
        out_f = model(images.flip(-1))["logits"].float()
        out_f = F.interpolate(out_f, size=images.shape[-2:], mode="bilinear", align_corners=False)
        prob = 0.5 * (prob + out_f.softmax(1).flip(-1))
    return prob


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, cfg: EvalConfig, num_classes: int) -> Tensor:
    """Class probabilities [B, C, H, W] at image resolution."""
    if cfg.mode == "whole":
        return _logits(model, images, cfg.flip)
    B, _, H, W = images.shape
    ch, cw = cfg.crop_size
    sh, sw = cfg.stride
    rows = max(H - ch + sh - 1, 0) // sh + 1
    cols = max(W - cw + sw - 1, 0) // sw + 1
    prob = images.new_zeros(B, num_classes, H, W, dtype=torch.float32)
    hits = images.new_zeros(1, 1, H, W, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, max(H - ch, 0)), min(c * sw, max(W - cw, 0))
            y2, x2 = min(y1 + ch, H), min(x1 + cw, W)
            prob[:, :, y1:y2, x1:x2] += _logits(model, images[:, :, y1:y2, x1:x2], cfg.flip)
            hits[:, :, y1:y2, x1:x2] += 1
    return prob / hits


def evaluation_subsets(cfg: Config) -> dict[str, list[int]]:
    """SYNTHIA-trained models also report mIoU over its 16 and 13 classes."""
    if cfg.data.source.name == "synthia":
        from .data.classes import SYNTHIA13, SYNTHIA16
        return {"mIoU16": list(SYNTHIA16), "mIoU13": list(SYNTHIA13)}
    return {}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict], cfg: Config, device: torch.device, *,
             teacher: nn.Module | None = None, vis_path: str | Path | None = None,
             autocast: AbstractContextManager | None = None) -> dict:
    """Run ``model`` over the loader; returns {"mIoU", "IoU": {class: IoU}, (mIoU16, mIoU13)}."""
    from .data.classes import CITYSCAPES_CLASSES, PALETTE

    num_classes = cfg.model.num_classes
    was_training = model.training
    model.eval()
    conf = ConfusionMatrix(num_classes)
    vis_rows: list = []
    seen = 0
    for batch in loader:
        if cfg.eval.max_images and seen >= cfg.eval.max_images:
            break
        seen += batch["image"].shape[0]
        images = batch["image"].to(device)
        labels = batch["label"].to(device)
        with autocast or nullcontext():
            prob = predict(model, images, cfg.eval, num_classes)
        pred = prob.argmax(1)
        conf.update(pred, labels)
        if vis_path is not None and len(vis_rows) < cfg.eval.num_vis:
            with autocast or nullcontext():
                pseudo = (predict(teacher, images, cfg.eval, num_classes).argmax(1)
                          if teacher is not None else pred)
            for i in range(min(images.shape[0], cfg.eval.num_vis - len(vis_rows))):
                vis_rows.append([denormalize(images[i], cfg.data.mean, cfg.data.std),
                                 colorize(labels[i], PALETTE), colorize(pseudo[i], PALETTE),
                                 colorize(pred[i], PALETTE)])
    conf.all_reduce()  # summed over the ranks: every rank sees the same total below
    if was_training:
        model.train()
    if int(conf.matrix.sum()) == 0:  # an mIoU over nothing is not a number to report
        from .data.io import DataError
        raise DataError(cfg.data.val.root, f"the evaluation saw no labelled pixels "
                                           f"({seen} image(s) of {cfg.data.val.name}/"
                                           f"{cfg.data.val.split} on this rank)")
    if vis_path is not None and vis_rows:
        save_grid(vis_path, vis_rows)
    names = list(CITYSCAPES_CLASSES[:num_classes]) if num_classes <= len(CITYSCAPES_CLASSES) \
        else [str(i) for i in range(num_classes)]
    return conf.summary(names, evaluation_subsets(cfg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastuda.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML config of the run")
    parser.add_argument("--checkpoint", required=True, help="checkpoint (.pt) to evaluate")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--weights", choices=("student", "teacher"), default="student")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .data import DataError, build_val_loader
    from .engine.checkpoint import CheckpointLoadError, load_checkpoint
    from .models import build_network
    from .train import pick_device

    device = pick_device(cfg.train.device)
    model = build_network(cfg).to(device)  # HRDA's multi-resolution inference when enabled
    try:
        state = load_checkpoint(args.checkpoint)
        # a training checkpoint holds {"trainer": {"student": ..., "teacher": ...}}; a bare state
        # dict of the model is accepted too
        weights = state["trainer"][args.weights] if "trainer" in state else state
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:  # missing / unexpected keys, shapes of another model
            raise CheckpointLoadError(f"{args.checkpoint} does not hold weights of the model "
                                      f"{args.config} describes: {err}") from None
        record = evaluate(model, build_val_loader(cfg.data), cfg, device)
    except (FileNotFoundError, CheckpointLoadError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_table(record))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
