"""Export a trained network for inference outside fastuda:
``python -m fastuda.export CONFIG --checkpoint PATH --format onnx|torchscript --output FILE``.

The exported graph takes ``image``: float32 [B, 3, H, W], RGB in 0..255 (the config's mean/std
normalisation is inside the graph), and returns ``logits``: float32 [B, num_classes, H, W], the
model's logits bilinearly upsampled to the input size (argmax = the class). By default batch,
height and width are dynamic; ``--size H W`` fixes the height and width (the batch stays
dynamic). It is the whole-image forward of the student (``--weights teacher``: the EMA
teacher); sliding windows and flips are left to the caller. An HRDA run exports its
single-scale network (the model HRDA wraps, without the scale attention or the multi-resolution
fusion), and says so.

ONNX uses torch.onnx's dynamo exporter (needs ``onnx`` and ``onnxscript``, the ``export`` extra)
and only the standard ONNX operator set; with ``onnxruntime`` installed the export is run once on
a random image and its largest absolute logit difference from PyTorch is reported. TorchScript
is a trace (``torch.jit.load`` runs it without fastuda).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, load_cli_config

FORMATS = ("onnx", "torchscript")
# ONNX protobufs are limited to 2 GB: larger weights go to a side file
_ONNX_INLINE_LIMIT = 1_800_000_000


class ExportError(RuntimeError):
    """The network cannot be exported as asked; the message says why."""


class InferenceNet(nn.Module):
    """RGB 0..255 -> normalised -> the segmentation model -> logits at the input size."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: Tensor) -> Tensor:
        logits = self.model((image - self.mean) / self.std)["logits"].float()
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


def inference_net(cfg: Config, model: nn.Module) -> tuple[InferenceNet, str | None]:
    """The network to export, and a note when it is not the whole of ``model`` (HRDA)."""
    from .models import HRDAModel

    note = None
    if isinstance(model, HRDAModel):
        note = ("HRDA: exporting the single-scale network HRDA wraps (no scale attention, no "
                "multi-resolution fusion); its predictions differ from fastuda.evaluate's HRDA "
                "inference")
        model = model.model
    return InferenceNet(model, cfg.data.mean, cfg.data.std).eval(), note


def example_input(size: tuple[int, int], batch: int = 2, seed: int = 0) -> Tensor:
    """A random RGB image batch; batch 2 so the exporter does not fix the batch to 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=g) * 255


def export_onnx(net: InferenceNet, path: Path, size: tuple[int, int], dynamic: bool) -> None:
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError:
        raise ExportError("ONNX export needs the onnx and onnxscript packages: pip install "
                          "'fastuda[export]'") from None
    from torch.export import Dim

    # the batch is always dynamic; --size fixes height and width. Sides of 32 or more (as
    # --size): without the bound torch.export cannot prove a ViT's token grid > 1, and the ONNX
    # exporter's fallback then fixes the traced size into the graph (wrong at other sizes)
    axes = {0: Dim("batch"), 2: Dim("height", min=32), 3: Dim("width", min=32)} if dynamic \
        else {0: Dim("batch")}
    inline = sum(t.numel() * t.element_size() for t in net.state_dict().values()) \
        < _ONNX_INLINE_LIMIT
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(net, (example_input(size),), str(path), dynamo=True,
                          input_names=["image"], output_names=["logits"], dynamic_shapes=(axes,),
                          external_data=not inline, verbose=False)
    nonstandard = onnx_custom_ops(path)
    if nonstandard:
        raise ExportError(f"{path}: the exported graph uses operators outside the standard ONNX "
                          f"set: {', '.join(nonstandard)}")


def onnx_custom_ops(path: Path) -> list[str]:
    """Operators of an ONNX file outside the standard domains (ai.onnx, "")."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    nodes = list(proto.graph.node)
    for fn in proto.functions:
        nodes.extend(fn.node)
    return sorted({f"{n.domain}::{n.op_type}" for n in nodes
                   if n.domain not in ("", "ai.onnx")})


def export_torchscript(net: InferenceNet, path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(net, (example_input(size),), check_trace=False)
    traced.save(str(path))


def run_exported(path: Path, fmt: str, image: Tensor) -> Tensor | None:
    """The exported file's logits for ``image`` (None for ONNX without onnxruntime)."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path), map_location="cpu")(image)
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"image": image.numpy()})[0])


def parity(net: InferenceNet, path: Path, fmt: str, size: tuple[int, int],
           dynamic: bool = False) -> float | None:
    """Max abs logit difference between the export and PyTorch on one random image (of a batch
    other than the traced one's, to exercise a dynamic batch); ``dynamic``: on a second image of
    another, odd size too (a graph that fixed the traced size fails there)."""
    sizes = [size] + ([(size[0] + 13, size[1] + 7)] if dynamic else [])
    worst = 0.0
    for i, hw in enumerate(sizes):
        image = example_input(hw, batch=1, seed=1 + i)
        out = run_exported(path, fmt, image)
        if out is None:
            return None
        with torch.no_grad():
            ref = net(image)
        if out.shape != ref.shape:
            raise ExportError(f"{path}: exported logits have shape {tuple(out.shape)}, PyTorch's "
                              f"{tuple(ref.shape)}")
        worst = max(worst, float((out - ref).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    from .evaluate import checkpoint_parser

    parser = checkpoint_parser("python -m fastuda.export", __doc__)
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--output", required=True, metavar="FILE")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="fixed input height and width (default: dynamic; traced at "
                             "data.crop_size)")
    args = parser.parse_args(argv)
    cfg = load_cli_config(args.config, args.set)
    if cfg is None:
        return 2
    from .engine.checkpoint import CheckpointLoadError
    from .evaluate import load_model

    if args.size is not None and min(args.size) < 32:
        print(f"error: --size {args.size[0]} {args.size[1]}: height and width must be >= 32",
              file=sys.stderr)
        return 1
    size = tuple(args.size) if args.size else tuple(cfg.data.crop_size)
    out = Path(args.output)
    try:
        model = load_model(cfg, args.checkpoint, args.weights,
                           torch.device("cpu"), args.config)
        net, note = inference_net(cfg, model)
        if note:
            print(f"note: {note}")
        if args.format == "onnx":
            export_onnx(net, out, size, dynamic=args.size is None)
        else:
            export_torchscript(net, out, size)
        diff = parity(net, out, args.format, size,
                      dynamic=args.format == "onnx" and args.size is None)
    except (FileNotFoundError, CheckpointLoadError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: cannot write {out}: {err}", file=sys.stderr)
        return 1
    shape = "dynamic batch, height and width" if args.size is None and args.format == "onnx" \
        else (f"input {size[0]}x{size[1]}" if args.format == "onnx" else
              "traced; any batch and size")
    print(f"exported {args.weights} to {out} ({args.format}, "
          f"{shape}); input 'image' float32 [B, 3, H, W] RGB 0..255, output 'logits' "
          f"[B, {cfg.model.num_classes}, H, W]")
    if diff is None:
        print("onnxruntime is not installed: the export was not run (pip install onnxruntime)")
    else:
        print(f"max abs logit difference vs PyTorch: {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
