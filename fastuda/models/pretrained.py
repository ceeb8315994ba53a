"""Loading pretrained weights from local files (nothing is ever downloaded).

Accepted formats, recognised from their keys:

- ``torchvision_resnet``: torchvision's ImageNet ResNet state dicts (``conv1.weight``, ``bn1.*``,
  ``layer3.4.conv2.weight``, ``layer1.0.downsample.1.running_var`` ...); ``fc.*`` is dropped.
  The DeepLab release's COCO-pretrained ResNet-101 (``resnet101COCO-41f33a49.pth``, CorDA's
  initialisation, for ``resnet101_deeplab``) has the same names; its ``layer5.conv2d_list.*``
  (the COCO classifier) is dropped.
- ``mmcv_resnet_v1c``: the open-mmlab ``resnet50_v1c`` / ``resnet101_v1c`` ImageNet files
  (``open-mmlab://resnet101_v1c``, mmcv's layout of mmseg's ResNetV1c: ``stem.0.weight``,
  ``stem.1.running_var``, ``stem.3.*``, ``stem.4.*``, ``stem.6.*``, ``stem.7.*``, then the stages
  as torchvision names them); strict like the ViT formats, for a ``*_v1c`` backbone only;
  ``fc.*`` is dropped.
- ``mit``: the released ImageNet MiT checkpoints (``mit_b5.pth``: ``patch_embed1.proj.weight``,
  ``block1.0.attn.q.weight``, ``block1.0.attn.kv.weight``, ``block1.0.attn.sr.weight``,
  ``block1.0.mlp.dwconv.dwconv.weight``, ``norm4.bias`` ...); ``head.*`` is dropped.
- ``dinov2``: the officially released DINOv2 checkpoints (``dinov2_vitb14_pretrain.pth``:
  ``cls_token``, ``pos_embed``, ``mask_token``, ``patch_embed.proj.weight``,
  ``blocks.11.attn.qkv.weight``, ``blocks.11.ls1.gamma``, ``blocks.11.mlp.fc1.weight`` (ViT-g:
  ``blocks.39.mlp.w12.weight`` / ``w3``), ``norm.weight`` ...); ``mask_token`` is dropped (token
  masking is not part of the model), ``w12``/``w3`` become timm's ``fc1``/``fc2``.
- ``timm_vit``: timm's DINOv2 weights (``model.safetensors`` of ``vit_*_patch14_dinov2``, or a
  ``.pth`` of that state dict): the same keys with ``fc1``/``fc2``; a classifier ``head.*`` is
  dropped.
- ``fastuda``: a state dict of a fastuda SegModel (``backbone.*``, ``decode_head.*`` ...).

A checkpoint may be wrapped in ``{"state_dict": ...}`` or ``{"model": ...}`` and its keys may carry
DDP's ``module.`` prefix, or the ``Scale.`` prefix of the DeepLab-V2 ImageNet initialisation
converted from Caffe (``DeepLab_resnet_pretrained_init``; DASS's ``DeepLab_init.pth``, whose first
key part cvlab-yonsei/DASS model/model_builder.py#L76-L81 drops): torchvision's names under it.
``channels = "bgr"`` (``model.pretrained_channels``) reverses the input channels of the file's
first convolution, for files trained on BGR images.

Each backbone key is mapped by an explicit pattern; keys that match no
pattern are reported as unexpected, model keys left untouched as missing, and a shape mismatch is an
error naming the key and both shapes. The ViT formats are strict: a transformer key the file lacks,
or a file key with no place in the transformer, is an error that names it. Files are read with
``torch.load(weights_only=True)``, ``.safetensors`` files with safetensors (a dependency of timm).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import SegModel
from .daformer import DAFormer
from .deeplabv2 import DeepLabV2
from .vit import ViTSegModel

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_LN = r"(weight|bias)"
# torchvision ResNet (all depths): stem, stage blocks, projection shortcuts
_RESNET_KEY = re.compile(
    rf"^(conv1\.weight|bn1\.{_BN}"
    rf"|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.{_BN}"
    rf"|downsample\.0\.weight|downsample\.1\.{_BN}))$")
# the ImageNet classifier; the DeepLab release's COCO file (resnet101_deeplab) carries its
# COCO ASPP classifier as layer5
_RESNET_DROPPED = re.compile(r"^(fc\.(weight|bias)|layer5\.conv2d_list\.\d+\.(weight|bias))$")
# mmcv's ResNetV1c: the deep stem (convs 0, 3, 6; BNs 1, 4, 7), then the same stages
_RESNET_V1C_KEY = re.compile(
    rf"^(stem\.[036]\.weight|stem\.[147]\.{_BN}"
    rf"|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.{_BN}"
    rf"|downsample\.0\.weight|downsample\.1\.{_BN}))$")
# released MiT (SegFormer) ImageNet checkpoints
_MIT_KEY = re.compile(
    rf"^(patch_embed[1-4]\.(proj\.(weight|bias)|norm\.{_LN})"
    rf"|block[1-4]\.\d+\.(norm[12]\.{_LN}"
    rf"|attn\.(q|kv|proj|sr)\.(weight|bias)|attn\.norm\.{_LN}"
    rf"|mlp\.(fc1|fc2|dwconv\.dwconv)\.(weight|bias))"
    rf"|norm[1-4]\.{_LN})$")
_MIT_DROPPED = re.compile(r"^head\.(weight|bias)$")
# DINOv2 ViTs in timm's layout, and the official release's (SwiGLU MLP of ViT-g as w12/w3)
_VIT_COMMON = (rf"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.{_LN}"
               rf"|blocks\.\d+\.(norm[12]\.{_LN}|attn\.(qkv|proj)\.(weight|bias)"
               rf"|ls[12]\.gamma|mlp\.(fc1|fc2")
_TIMM_VIT_KEY = re.compile(rf"^({_VIT_COMMON})\.(weight|bias)))$")
_DINOV2_KEY = re.compile(rf"^({_VIT_COMMON}|w12|w3)\.(weight|bias)))$")
_TIMM_VIT_DROPPED = re.compile(r"^head\.(weight|bias)$")
_DINOV2_DROPPED = re.compile(r"^mask_token$")


def _dinov2_to_timm(key: str) -> str:
    return re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key))


# format -> (backbone key pattern, dropped-key pattern, model class it fits, where the backbone's
# keys live in the model, key renaming, strict: every backbone key must come from the file)
_BACKBONE_FORMATS = {
    "torchvision_resnet": (_RESNET_KEY, _RESNET_DROPPED, DeepLabV2, "backbone.", None, False),
    "mmcv_resnet_v1c": (_RESNET_V1C_KEY, _RESNET_DROPPED, DeepLabV2, "backbone.", None, True),
    "mit": (_MIT_KEY, _MIT_DROPPED, DAFormer, "backbone.", None, False),
    # a tie between the two ViT layouts (no mask_token, no w12) is timm's: listed first
    "timm_vit": (_TIMM_VIT_KEY, _TIMM_VIT_DROPPED, ViTSegModel, "backbone.vit.", None, True),
    "dinov2": (_DINOV2_KEY, _DINOV2_DROPPED, ViTSegModel, "backbone.vit.", _dinov2_to_timm, True),
}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file safely and return its flat tensor state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    try:
        obj: Any
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as err:
        raise ValueError(f"cannot read {path}: .safetensors files need the safetensors package "
                         f"(pip install safetensors; timm brings it)") from err
    except Exception as err:  # unpickling errors come in many types; name the file
        raise ValueError(f"cannot read pretrained checkpoint {path}: {err}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"pretrained checkpoint {path} holds no state dict "
                         f"(got {type(obj).__name__})")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"pretrained checkpoint {path}: entry {key!r} is a "
                             f"{type(value).__name__}, not a tensor")
        state[key.removeprefix("module.").removeprefix("Scale.")] = value
    return state


def detect_format(state: dict[str, Tensor]) -> str:
    """Name the checkpoint format whose patterns match most keys ("unknown" when none)."""
    scores = {"fastuda": sum(k.startswith("backbone.") for k in state)}
    for name, (pattern, dropped, *_) in _BACKBONE_FORMATS.items():
        # the dropped keys count too: they tell the two ViT layouts apart (mask_token)
        scores[name] = sum(bool(pattern.match(k)) or bool(dropped.match(k)) for k in state)
    best = max(scores, key=scores.__getitem__)
    return best if scores[best] > 0 else "unknown"


def map_keys(state: dict[str, Tensor], fmt: str) -> tuple[dict[str, str], list[str], list[str]]:
    """Map checkpoint keys to model keys. Returns (checkpoint -> model key, dropped, unmatched)."""
    mapping: dict[str, str] = {}
    dropped: list[str] = []
    unmatched: list[str] = []
    for key in state:
        if fmt == "fastuda":
            mapping[key] = key
            continue
        pattern, dropped_pattern, _, prefix, rename, _ = _BACKBONE_FORMATS[fmt]
        if pattern.match(key):
            mapping[key] = prefix + (rename(key) if rename else key)
        elif dropped_pattern.match(key):
            dropped.append(key)  # the ImageNet classifier: not part of a segmentation model
        else:
            unmatched.append(key)
    return mapping, dropped, unmatched


# the first convolution of each ResNet stem (torchvision's 7x7, mmcv's deep stem)
FIRST_CONV = ("backbone.conv1.weight", "backbone.stem.0.weight")


def load_pretrained(model: SegModel, path: str | Path, channels: str = "rgb") -> dict[str, Any]:
    """Load a local checkpoint into ``model``; return a report of what was loaded. ``channels``:
    the colour order the file's first convolution reads ("bgr" reverses its input channels).

    Report keys: ``path``, ``format``, ``loaded`` (model keys set), ``missing`` (model keys of the
    loaded part left at their initialisation: backbone keys for backbone checkpoints, any key for
    fastuda ones), ``unexpected`` (checkpoint keys with no place in the model) and ``dropped``
    (ImageNet classifier keys, skipped by design). Raises on shape mismatches, on unreadable files
    and when nothing in the file fits the model.
    """
    state = read_state_dict(path)
    fmt = detect_format(state)
    if fmt == "unknown":
        raise ValueError(f"pretrained checkpoint {path}: keys match no known format (torchvision "
                         f"ResNet, released MiT, DINOv2, timm ViT, fastuda model); first keys: "
                         f"{list(state)[:5]}")
    if fmt in _BACKBONE_FORMATS and not isinstance(model, _BACKBONE_FORMATS[fmt][2]):
        raise ValueError(f"pretrained checkpoint {path} is a {fmt} checkpoint, which does not fit "
                         f"a {type(model).__name__} model")
    deep_stem = bool(getattr(getattr(model, "backbone", None), "deep_stem", False))
    if fmt == "torchvision_resnet" and deep_stem:
        raise ValueError(f"pretrained checkpoint {path} is a torchvision ResNet checkpoint (7x7 "
                         f"stem conv1), which does not fit the deep stem of "
                         f"{model.backbone.depth!r}: use the open-mmlab "
                         f"{model.backbone.depth} file, or model.backbone = "
                         f"{model.backbone.depth.removesuffix('_v1c')!r}")
    mapping, dropped, unexpected = map_keys(state, fmt)
    own = model.state_dict()
    strict = fmt in _BACKBONE_FORMATS and _BACKBONE_FORMATS[fmt][5]
    if strict:
        _check_strict(path, fmt, mapping, unexpected, own, _BACKBONE_FORMATS[fmt][3])
    to_load: dict[str, Tensor] = {}
    for ckpt_key, model_key in mapping.items():
        if model_key not in own:
            unexpected.append(ckpt_key)
            continue
        src, dst = state[ckpt_key], own[model_key]
        if src.shape != dst.shape:
            raise ValueError(f"pretrained checkpoint {path}: shape mismatch for {ckpt_key!r} "
                             f"(model key {model_key!r}): checkpoint {tuple(src.shape)}, "
                             f"model {tuple(dst.shape)}")
        to_load[model_key] = src
    if not to_load:
        raise ValueError(f"pretrained checkpoint {path} ({fmt}): no key fits the "
                         f"{type(model).__name__} model; first keys: {list(state)[:5]}")
    if channels not in ("rgb", "bgr"):
        raise ValueError(f"channels must be 'rgb' or 'bgr', got {channels!r}")
    if channels == "bgr":
        first = [k for k in FIRST_CONV if k in to_load]
        if fmt == "fastuda" or not first:
            why = ("a fastuda model reads RGB already" if fmt == "fastuda"
                   else "the file has no ResNet stem convolution")
            raise ValueError(f"pretrained checkpoint {path} ({fmt}): model.pretrained_channels "
                             f"= 'bgr' reverses the input channels of the file's first "
                             f"convolution, but {why}: set it to 'rgb'")
        to_load[first[0]] = to_load[first[0]].flip(1)
    model.load_state_dict(to_load, strict=False)
    scope = _BACKBONE_FORMATS[fmt][3] if fmt in _BACKBONE_FORMATS else ""
    # old torchvision files predate BatchNorm's step counter; its absence changes nothing
    missing = [k for k in own if k.startswith(scope) and k not in to_load
               and not k.endswith("num_batches_tracked")]
    report = {"path": str(path), "format": fmt, "loaded": sorted(to_load),
              "missing": missing, "unexpected": unexpected, "dropped": dropped}
    if missing or unexpected:
        warnings.warn(f"pretrained checkpoint {path} ({fmt}): {len(missing)} missing key(s) "
                      f"{missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}",
                      stacklevel=2)
    return report


def _check_strict(path: str | Path, fmt: str, mapping: dict[str, str], unexpected: list[str],
                  own: dict[str, Tensor], scope: str) -> None:
    """The strict formats (ViTs, mmcv's ResNetV1c): every file key has a place and every backbone
    key comes from the file (a backbone loaded half-pretrained is worse than an error; BatchNorm's
    step counter, absent from older files, changes nothing)."""
    extra = unexpected + [k for k, m in mapping.items() if m not in own]
    if extra:
        raise ValueError(f"pretrained checkpoint {path} ({fmt}): unexpected key {extra[0]!r} "
                         f"(no place in the {scope.rstrip('.')} of this model; "
                         f"{len(extra)} such key(s): {extra[:5]})")
    given = set(mapping.values())
    missing = [k for k in own if k.startswith(scope) and k not in given
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"pretrained checkpoint {path} ({fmt}): missing key "
                         f"{missing[0][len(scope):]!r} (model key {missing[0]!r}; {len(missing)} "
                         f"missing: {[k[len(scope):] for k in missing[:5]]}); is it the "
                         f"checkpoint of another model size?")
