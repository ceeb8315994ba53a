"""Typed configuration: TOML files loaded into dataclasses, ``--set key=value`` overrides.

Every section is a dataclass; unknown keys, wrong types and invalid values are errors that name the
key. The resolved config is written back to the work dir as TOML, so a run is reproducible from it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the value."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
@dataclass
class DatasetConfig:
    """One domain's dataset. ``name`` picks the layout (see fastuda/data and spec/data.md)."""

    name: Literal[
        "gta", "cityscapes", "synthia", "dark_zurich", "synthetic_source", "synthetic_target",
        "synthetic_night", "folder",
    ] = "synthetic_source"
    root: str = "data/synthetic"
    split: str = "train"
    # resize every image (and label, nearest) to (width, height) before cropping; [] keeps the size
    resize: list[int] = field(default_factory=list)
    # keep the aspect ratio as mmcv's Resize(img_scale=resize, keep_ratio=True) does, the mmseg
    # releases' default (SePiCo mmseg/datasets/pipelines/transforms.py#L50): the largest size
    # whose long side fits max(resize) and short side min(resize) (GTA 1914x1052 -> 1280x704)
    keep_ratio: bool = False
    # "folder" datasets: Cityscapes-style pair described by suffixes and a label map
    image_dir: str = "images"
    label_dir: str = "labels"
    image_suffix: str = ".png"
    label_suffix: str = ".png"
    # label map "raw id -> train id" for "folder" datasets; empty means labels are train ids already
    label_map: dict[str, int] = field(default_factory=dict)
    num_classes: int = 19
    # source stream only: torchvision's ColorJitter(brightness, contrast, saturation, hue) on
    # every training crop before normalisation, factors uniform in [max(0, 1 - x), 1 + x] (hue
    # shift in [-h, h]), the four in a random order (fastuda/data/augment.py ColorJitterDraw);
    # SPCL's source augmentation, [0.5, 0.5, 0.5, 0.2] (configs/deeplabv2_r101_cl.yaml#L9-L13).
    # [] = none
    color_jitter: list[float] = field(default_factory=list)


@dataclass
class DataConfig:
    source: DatasetConfig = field(default_factory=DatasetConfig)
    target: DatasetConfig = field(
        default_factory=lambda: DatasetConfig(name="synthetic_target"))
    val: DatasetConfig = field(
        default_factory=lambda: DatasetConfig(name="synthetic_target", split="val"))
    loader: Literal["auto", "dali", "torch"] = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    batch_size: int = 2  # images per domain per step (per process)
    num_workers: int = 2
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # (height, width)
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    # the random scale drawn from these values, equally likely, instead of uniformly in
    # ratio_range (then [1, 1]): DASS's random.choice([0.8, 1.0, 1.2]) (dataset/joint_transforms.py
    # #L432); [] draws from ratio_range
    scale_choices: list[float] = field(default_factory=list)
    # a rescaled image smaller than the crop: "pad" it (mmseg: image 0 after normalisation, label
    # 255) or "resize": enlarge it, aspect kept, until the crop fits (DASS crops the largest
    # square and resizes it to the crop, dataset/joint_transforms.py#L108-L112, #L330-L356)
    small_crop: Literal["pad", "resize"] = "pad"
    cat_max_ratio: float = 0.75  # the source crop; the target stream never reads its labels
    flip_prob: float = 0.5
    # where validation predictions are scored: "resized" (labels resized, nearest, with the image
    # to data.val.resize) or "original" (the label files' size, the prediction resized to it as
    # mmseg's rescale does; SePiCo mmseg/models/segmentors/encoder_decoder_projector.py#L247-L264)
    val_labels: Literal["resized", "original"] = "resized"
    # rare class sampling on the source (DAFormer): P(c) = softmax((1 - f_c) / T)
    rcs: bool = True
    rcs_temperature: float = 0.01
    rcs_min_pixels: int = 3000  # scaled by image area / (1024 x 512) for smaller images
    rcs_min_crop_ratio: float = 0.5  # a rare-class crop must hold this share of rcs_min_pixels
    # ImageNet normalisation
    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])

    def __post_init__(self) -> None:
        _check(len(self.crop_size) == 2 and min(self.crop_size) > 0, "data.crop_size",
               self.crop_size, "two positive integers (height, width)")
        _check(len(self.ratio_range) == 2 and 0 < self.ratio_range[0] <= self.ratio_range[1],
               "data.ratio_range", self.ratio_range, "two numbers 0 < lo <= hi")
        _check(all(math.isfinite(r) and r > 0 for r in self.scale_choices), "data.scale_choices",
               self.scale_choices, "[] or finite scales > 0")
        # two ways to draw one scale: the one not in use must be the identity
        _check(not self.scale_choices or self.ratio_range == [1.0, 1.0], "data.ratio_range",
               self.ratio_range, f"[1.0, 1.0] with data.scale_choices = {self.scale_choices} "
               "(the scale is drawn from one of them)")
        _check(0 < self.cat_max_ratio <= 1, "data.cat_max_ratio", self.cat_max_ratio, "in (0, 1]")
        jitter = self.source.color_jitter
        _check(jitter == [] or (len(jitter) == 4 and all(math.isfinite(x) and x >= 0
                                                          for x in jitter) and jitter[3] <= 0.5),
               "data.source.color_jitter", jitter,
               "[] or [brightness, contrast, saturation, hue], each >= 0, hue <= 0.5")
        for name in ("target", "val"):  # the release jitters its source images only
            _check(getattr(self, name).color_jitter == [], f"data.{name}.color_jitter",
                   getattr(self, name).color_jitter, "[] (only the source stream is jittered)")
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, ">= 1")
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        _check(self.rcs_temperature > 0, "data.rcs_temperature", self.rcs_temperature, "> 0")


@dataclass
class ModelConfig:
    name: Literal["deeplabv2", "daformer", "vit"] = "daformer"
    # deeplabv2: resnet18 | resnet50 | resnet101 (torchvision's 7x7 stem) | resnet50_v1c |
    # resnet101_v1c (mmseg's ResNetV1c, deep 3x3 stem: the SePiCo/DAFormer releases) |
    # resnet101_deeplab (the DeepLab-V2 release's Caffe layout, CorDA's COCO-pretrained file);
    # daformer: mit_b0 ... mit_b5;
    # vit: dinov2_vits14 | dinov2_vitb14 | dinov2_vitl14 | dinov2_vitg14 (fastuda/models/vit.py)
    backbone: str = "mit_b5"
    num_classes: int = 19
    pretrained: str = ""  # local checkpoint path; nothing is downloaded
    # the colour order the pretrained file's first convolution reads. "bgr": the Caffe-converted
    # DeepLab ResNet-101 files, which the DASS and CorDA releases feed BGR images minus the Caffe
    # mean (DASS dataset/transforms.py#L127-L150; CorDA data/gta5_dataset.py#L80-L81): that
    # convolution's input channels are reversed when loading, so the network reads fastuda's RGB
    # images with the same result (conv(BGR x, W) = conv(RGB x, W reversed)); data.mean and
    # data.std stay in RGB order
    pretrained_channels: Literal["rgb", "bgr"] = "rgb"
    decoder_channels: int = 256
    projection: bool = True  # SePiCo projection head (embeddings output)
    embed_dim: int = 0  # 0: the published size (512 deeplabv2, 256 daformer and vit)
    drop_path: float = 0.1
    dropout: float = 0.1
    channels_last: bool = False
    # vit only: the decode head ("vfm_uda": the released VFM-UDA head on the last layer,
    # "daformer": the DAFormer decoder on a four-level pyramid), how images become multiples of
    # the patch size 14 ("pad" with zeros, or "resize" by about vit_resize_scale as VFM-UDA does)
    vit_head: Literal["vfm_uda", "daformer"] = "vfm_uda"
    vit_input: Literal["pad", "resize"] = "pad"
    vit_resize_scale: float = 1.0
    grad_checkpointing: bool = False  # vit only: recompute each block in the backward
    layer_decay: float = 1.0  # vit only: block i of n at lr * layer_decay ** (n - 1 - i)
    # deeplabv2 only: the backbone's BatchNorm weights and biases are not trained (the
    # normalisation still uses the batch statistics in training), as CorDA's and DASS's releases
    freeze_bn_affine: bool = False
    # deeplabv2 only: the backbone's BatchNorm layers stay in eval mode in training too, so they
    # normalise with their (pretrained) running statistics and never update them; with
    # freeze_bn_affine as well that is SPCL's FrozenBatchNorm2d (MODEL.FREEZE_BN,
    # core/models/feature_extractor.py#L40-L46, core/models/layers.py#L6-L24). The EMA teacher's
    # copies of these layers stay in eval mode whatever self_training.teacher_norm says
    freeze_bn: bool = False
    # 0: the published stride (8 deeplabv2, 4 daformer); deeplabv2 also takes 16 (only the
    # last stage dilated: half the backbone's compute, for CPU demos)
    output_stride: int = 0

    @property
    def net_output_stride(self) -> int:
        """The network's output stride: ``output_stride`` where set, else the model's own."""
        return self.output_stride or OUTPUT_STRIDE[self.name]

    def __post_init__(self) -> None:
        allowed = {"deeplabv2": ("resnet18", "resnet50", "resnet101", "resnet50_v1c",
                                 "resnet101_v1c", "resnet101_deeplab"),
                   "daformer": tuple(f"mit_b{i}" for i in range(6)),
                   "vit": tuple(f"dinov2_vit{s}14" for s in "sblg")}[self.name]
        _check(self.backbone in allowed, "model.backbone", self.backbone,
               f"one of {allowed} for model.name = {self.name!r}")
        _check(self.num_classes >= 1, "model.num_classes", self.num_classes, ">= 1")
        _check(0 <= self.drop_path < 1, "model.drop_path", self.drop_path, "in [0, 1)")
        _check(self.vit_resize_scale > 0, "model.vit_resize_scale", self.vit_resize_scale, "> 0")
        _check(0 < self.layer_decay <= 1, "model.layer_decay", self.layer_decay, "in (0, 1]")
        if self.name == "vit":
            _check(importlib.util.find_spec("timm") is not None, "model.name", self.name,
                   "a model whose library is installed: 'vit' needs timm "
                   "(pip install 'fastuda[vit]')")
        else:  # knobs only the ViT has: an error rather than silently unused
            for key, default in (("grad_checkpointing", False), ("layer_decay", 1.0)):
                _check(getattr(self, key) == default, f"model.{key}", getattr(self, key),
                       f"{default!r} for model.name = {self.name!r} (only 'vit' has it)")
        if self.name != "deeplabv2":
            for key in ("freeze_bn_affine", "freeze_bn"):
                _check(not getattr(self, key), f"model.{key}", getattr(self, key),
                       f"false for model.name = {self.name!r} (only 'deeplabv2' has it)")
            _check(self.pretrained_channels == "rgb", "model.pretrained_channels",
                   self.pretrained_channels,
                   f"'rgb' for model.name = {self.name!r} (the BGR files are DeepLab ResNets)")
        strides = {"deeplabv2": (0, 8, 16)}.get(self.name, (0,))
        _check(self.output_stride in strides, "model.output_stride", self.output_stride,
               f"one of {strides} for model.name = {self.name!r}")


@dataclass
class OptimConfig:
    # "adamw" (the DAFormer/SePiCo lineage) or "sgd" (SGD with momentum, no Nesterov: the
    # DeepLab-V2 releases SPCL train_ours.py#L75-L80, DASS trainer/damnet_trainer.py#L182-L187,
    # CorDA trainUDA_gta.py#L344-L350); both with the head multiplier and no-decay rule below
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    poly_power: float = 1.0
    # the poly horizon: lr * (1 - it / poly_iters) ** poly_power; 0 = train.max_iters. SPCL's
    # release decays over MAX_ITER 62 500 but stops at STOP_ITER 40 000
    # (configs/deeplabv2_r101_cl.yaml#L17-L18), so its lr never reaches 0
    poly_iters: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    momentum: float = 0.9  # sgd only
    # parameters without weight decay: "mmseg" as the released DAFormer/SePiCo configs (names
    # containing norm/pos_block outside the heads: MiT's LayerNorms), "1d" every 1-D parameter
    # (fastuda's rule before issue 13); the ViT models keep their own (1-D) rule
    no_decay: Literal["mmseg", "1d"] = "mmseg"
    fused: bool = True  # fused AdamW where the device supports it
    grad_clip: float = 0.0  # 0 disables

    def __post_init__(self) -> None:
        # an infinite or negative value trains NaN weights (or fails deep inside torch)
        _check(math.isfinite(self.lr) and self.lr > 0, "optim.lr", self.lr, "a finite number > 0")
        _check(math.isfinite(self.head_lr_mult) and self.head_lr_mult > 0, "optim.head_lr_mult",
               self.head_lr_mult, "a finite number > 0")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
               "optim.weight_decay", self.weight_decay, "a finite number >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               self.betas, "two numbers in [0, 1)")
        _check(self.warmup_iters >= 0, "optim.warmup_iters", self.warmup_iters, ">= 0")
        _check(self.poly_iters >= 0, "optim.poly_iters", self.poly_iters,
               ">= 0 (0: train.max_iters)")
        _check(math.isfinite(self.momentum) and 0 <= self.momentum < 1, "optim.momentum",
               self.momentum, "in [0, 1)")
        _check(math.isfinite(self.poly_power) and self.poly_power > 0, "optim.poly_power",
               self.poly_power, "a finite number > 0")
        _check(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip",
               self.grad_clip, "a finite number >= 0 (0 disables)")


@dataclass
class SelfTrainingConfig:
    enabled: bool = True  # False: source-only baseline
    ema_alpha: float = 0.999
    pseudo_threshold: float = 0.968
    ignore_top: int = 0  # rows of the pseudo-label weight zeroed (GTA->Cityscapes: 15)
    ignore_bottom: int = 0  # (GTA->Cityscapes: 120)
    mix: Literal["classmix", "none"] = "classmix"
    color_jitter_strength: float = 0.2
    color_jitter_prob: float = 0.8
    blur_prob: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.15, 1.15])
    # how the teacher's normalisation layers normalise: "batch" (released DAFormer/SePiCo/HRDA/
    # MIC: the teacher stays in train mode with only dropout and drop-path off, so BatchNorm uses
    # the statistics of the batch it sees; the EMA averages parameters only, sepico.py#L135-L144,
    # #L244-L248; DAFormer dacs.py#L264-L268) or "running" (eval mode: EMA-averaged running
    # statistics, fastuda before issue 13)
    teacher_norm: Literal["batch", "running"] = "batch"
    # which alpha the EMA after step `it` uses: "next" = alpha(it + 1) (released: the update at
    # the start of iteration t > 0 with alpha(t), SePiCo sepico.py#L133-L134, #L226-L227; DAFormer
    # dacs.py#L104-L105, #L217-L218) or "same" = alpha(it) (fastuda before issue 13)
    ema_alpha_step: Literal["next", "same"] = "next"
    # the pseudo-labels' quality weight q: "batch" (released: one scalar per batch, confident
    # pixels of all rows over all pixels, the ignored rows zeroed afterwards; SePiCo
    # sepico.py#L254-L256, DAFormer dacs.py#L274-L286) or "image" (one per image, counted
    # outside the ignored rows; fastuda before issue 13)
    quality_weight: Literal["batch", "image"] = "batch"
    # the mean of the unweighted (source) CE: "all" pixels, ignored and padded ones adding 0 (the
    # releases' mmseg v0.16 CrossEntropyLoss, SePiCo mmseg/models/losses/cross_entropy_loss.py
    # #L21-L32 with utils.py#L68-L69) or the "valid" (labelled) ones (fastuda before issue 13)
    source_ce_average: Literal["all", "valid"] = "all"
    # HRDA's pseudo-label margins (top, bottom, left, right), pixels of the target image as
    # resized by data.target.resize: pseudo-labels there get weight 0 wherever the crop lies
    # ([] = none; the released HRDA/MIC Cityscapes setting: [30, 240, 30, 30])
    pseudo_margins: list[int] = field(default_factory=list)
    class_balanced_crop: bool = False  # SePiCo target crop
    # after the crop, pseudo-labels made again by the teacher on the crop (SePiCo's released
    # regen_pseudo = True, experiments.py#L274); false cuts the whole image's teacher logits to
    # the crop instead, one teacher forward less per step (the CPU demos)
    class_balanced_crop_regen: bool = True
    # labels brought to a feature grid by majority vote keep a class holding this share of the
    # cell (the methods' label downscaling; SePiCo, SPCL, BiPCL)
    downscale_min_ratio: float = 0.75

    def __post_init__(self) -> None:
        _check(0 < self.pseudo_threshold < 1, "self_training.pseudo_threshold",
               self.pseudo_threshold, "in (0, 1)")
        _check(0 <= self.ema_alpha < 1, "self_training.ema_alpha", self.ema_alpha, "in [0, 1)")
        _check(self.pseudo_margins == [] or (len(self.pseudo_margins) == 4
                                             and min(self.pseudo_margins) >= 0),
               "self_training.pseudo_margins", self.pseudo_margins,
               "[] or four pixel counts >= 0 (top, bottom, left, right)")
        _check(0 < self.downscale_min_ratio <= 1, "self_training.downscale_min_ratio",
               self.downscale_min_ratio, "in (0, 1]")


# output stride of each model's logits and features (fastuda/models): HRDA aligns its detail box
# and sliding windows to it
OUTPUT_STRIDE = {"deeplabv2": 8, "daformer": 4, "vit": 4}


@dataclass
class HRDAConfig:
    """HRDA multi-resolution training and inference (Hoyer et al., ECCV 2022), see
    fastuda/models/hrda.py.

    The training crop (``data.crop_size``) is the full-resolution context crop: the context view is
    it downscaled by ``context_scale``, the detail view a random full-resolution sub-crop of
    ``detail_crop`` pixels; a learned scale attention fuses the two predictions. Inference: the
    context view of the whole image, detail predictions by sliding ``detail_crop`` windows (stride
    ``slide_stride``, default half the window) over the full-resolution image."""

    enabled: bool = False
    context_scale: float = 0.5  # 1 / context_scale must be an integer (published 0.5)
    detail_crop: list[int] = field(default_factory=lambda: [512, 512])  # (height, width), pixels
    # CE on the detail logits (labels cropped to the box); the fused CE counts 1 - this
    detail_loss_weight: float = 0.1
    attention_channels: int = 256  # hidden channels of the scale-attention head
    attention_classwise: bool = True  # one attention channel per class (false: one for all)
    crop_divisible: int = 8  # the detail box's corner: multiples of this many pixels
    slide_stride: list[int] = field(default_factory=list)  # (height, width); [] = detail_crop / 2

    def __post_init__(self) -> None:
        inv = 1.0 / self.context_scale if self.context_scale > 0 else 0.0
        _check(0 < self.context_scale < 1 and abs(inv - round(inv)) < 1e-6,
               "hrda.context_scale", self.context_scale,
               "in (0, 1) with 1 / context_scale an integer, e.g. 0.5")
        _check(len(self.detail_crop) == 2 and min(self.detail_crop) > 0, "hrda.detail_crop",
               self.detail_crop, "two positive integers (height, width)")
        _check(0 <= self.detail_loss_weight < 1, "hrda.detail_loss_weight",
               self.detail_loss_weight, "in [0, 1) (the fused CE counts 1 - it)")
        _check(self.crop_divisible >= 1, "hrda.crop_divisible", self.crop_divisible, ">= 1")
        _check(self.attention_channels >= 1, "hrda.attention_channels", self.attention_channels,
               ">= 1")
        _check(self.slide_stride == [] or (len(self.slide_stride) == 2
                                           and min(self.slide_stride) > 0
                                           and self.slide_stride[0] <= self.detail_crop[0]
                                           and self.slide_stride[1] <= self.detail_crop[1]),
               "hrda.slide_stride", self.slide_stride,
               "[] (half the detail crop) or two positive integers <= hrda.detail_crop")

    @property
    def stride(self) -> list[int]:
        """The sliding-window stride of the detail inference."""
        return list(self.slide_stride) or [self.detail_crop[0] // 2, self.detail_crop[1] // 2]

    def check_against(self, model: str, s: int, crop_size: list[int]) -> None:
        """Sizes that must fit the model's output stride s: the detail box and the crops are
        placed on the context grid (multiples of s / context_scale full-resolution pixels), the
        sliding windows on the detail grid (multiples of s)."""
        align = round(s / self.context_scale)
        for i, side in enumerate(("height", "width")):
            _check(self.detail_crop[i] <= crop_size[i], "hrda.detail_crop", self.detail_crop,
                   f"<= data.crop_size {crop_size} ({side})")
            _check(self.detail_crop[i] % align == 0, "hrda.detail_crop", self.detail_crop,
                   f"multiples of output stride / context_scale = {align} for {model}")
            _check(crop_size[i] % align == 0, "data.crop_size", crop_size,
                   f"multiples of output stride / context_scale = {align} with hrda.enabled "
                   f"for {model}")
            _check(self.stride[i] % s == 0, "hrda.slide_stride", self.stride,
                   f"multiples of the output stride {s} of {model}")
        _check(self.crop_divisible % s == 0, "hrda.crop_divisible", self.crop_divisible,
               f"a multiple of the output stride {s} of {model} (the detail logits tile the "
               "full grid)")


@dataclass
class OpsConfig:
    """``backend`` of every fastuda op. "triton" runs the Triton kernels of the contrast losses;
    ops without one (class_stats, downscale_labels) run the next backend that can serve the
    tensor (C++ on CPU, CUDA on GPU). Other explicit backends raise where they cannot serve."""
    backend: Literal["auto", "cpu", "cuda", "triton", "torch"] = "auto"


@dataclass
class EvalConfig:
    mode: Literal["whole", "slide"] = "whole"
    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    stride: list[int] = field(default_factory=lambda: [341, 341])
    flip: bool = False
    batch_size: int = 1
    num_vis: int = 4  # images in the vis/ PNG grid at each evaluation
    max_images: int = 0  # evaluate only the first N images of the split (0: all of them)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, ">= 1")
        _check(len(self.crop_size) == 2 and min(self.crop_size) > 0, "eval.crop_size",
               self.crop_size, "two positive integers (height, width)")
        _check(len(self.stride) == 2 and min(self.stride) > 0, "eval.stride", self.stride,
               "two positive integers (height, width)")
        _check(self.num_vis >= 0, "eval.num_vis", self.num_vis, ">= 0")
        _check(self.max_images >= 0, "eval.max_images", self.max_images, ">= 0 (0: all)")


@dataclass
class TrainConfig:
    max_iters: int = 40000
    eval_interval: int = 4000
    checkpoint_interval: int = 4000
    keep_checkpoints: int = 0  # iter_N.pt snapshots kept, the newest (0: all of them)
    log_interval: int = 50
    seed: int = 0
    deterministic: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops

    def __post_init__(self) -> None:
        _check(self.max_iters >= 1, "train.max_iters", self.max_iters, ">= 1")
        for key in ("eval_interval", "checkpoint_interval", "log_interval"):
            _check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), ">= 1")
        _check(self.keep_checkpoints >= 0, "train.keep_checkpoints", self.keep_checkpoints,
               ">= 0 (0 keeps every snapshot)")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", self.max_bad_steps, ">= 1")


def method_registry() -> dict[str, Any]:
    """The registered methods, name -> class (``fastuda.methods.METHODS``); each class carries
    its ``Settings`` dataclass, the ``[name]`` section of a config (docs/architecture.md)."""
    from .methods import METHODS  # methods import this module: resolved at call time

    return METHODS


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hrda: HRDAConfig = field(default_factory=HRDAConfig)
    # the methods of the run, in the order their hooks run ([] = plain self-training)
    methods: list[str] = field(default_factory=list)
    # name -> that method's settings (its own dataclass); in TOML each is a top-level section
    # named after the method ([sepico], [mic], ...); defaults fill the sections a file leaves out
    method_settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.model.num_classes == self.data.source.num_classes, "model.num_classes",
               self.model.num_classes, f"equal to data.source.num_classes "
               f"({self.data.source.num_classes})")
        if self.hrda.enabled:
            self.hrda.check_against(self.model.name, self.model.net_output_stride,
                                    self.data.crop_size)
        # past the horizon the poly factor (1 - it / poly_iters) would turn negative
        _check(self.optim.poly_iters == 0 or self.optim.poly_iters >= self.train.max_iters,
               "optim.poly_iters", self.optim.poly_iters,
               f"0 or >= train.max_iters ({self.train.max_iters})")
        registry = method_registry()
        for name in self.methods:
            _check(name in registry, "methods", self.methods,
                   f"names of registered methods ({', '.join(sorted(registry))})")
        _check(len(set(self.methods)) == len(self.methods), "methods", self.methods,
               "each method once")
        for name in self.method_settings:
            if name not in self.methods:
                raise ConfigError(f"section [{name}] configures method {name!r}, which is not "
                                  f"in methods = {self.methods}: add it there or remove the "
                                  "section")
        for name in self.methods:
            settings = self.method_settings.setdefault(name, registry[name].Settings())
            _check(isinstance(settings, registry[name].Settings), f"[{name}]",
                   type(settings).__name__, registry[name].Settings.__name__)
            if registry[name].needs_self_training and not self.self_training.enabled:
                raise ConfigError(f"methods = [..., {name!r}] adapts with the self-training "
                                  "loop (the EMA teacher's pseudo-labels): set "
                                  "self_training.enabled = true")
            registry[name].check_config(self)
        if self.self_training.class_balanced_crop and not \
                self.self_training.class_balanced_crop_regen:
            from .methods.base import Method

            # the reused crop carries the teacher's logits only: a method refining pseudo-labels
            # from other teacher outputs (embeddings, depth) needs them made on the crop
            refining = [n for n in self.methods
                        if registry[n].refine_pseudo_labels is not Method.refine_pseudo_labels]
            _check(not refining, "self_training.class_balanced_crop_regen", False,
                   f"true with methods {refining} (they refine pseudo-labels from the teacher's "
                   "outputs on the crop)")

    def settings(self, name: str) -> Any:
        """The ``[name]`` section of a method of this run."""
        if name not in self.method_settings:
            raise KeyError(f"method {name!r} is not in methods = {self.methods}")
        return self.method_settings[name]


# ----------------------------------------------------------------------------------------------
# Loading, overrides, saving
# ----------------------------------------------------------------------------------------------
def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value for {key}: {value!r} (expected {expected})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:  # built elsewhere (the method sections, see from_dict)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"invalid value for {key}: {value!r} "
                              f"(expected one of {list(typing.get_args(tp))})")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"invalid value for {key}: {value!r} (expected {tp})")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is type(None) and value is None:
        return None
    wrong = isinstance(tp, type) and (not isinstance(value, tp)
                                      or (tp is int and isinstance(value, bool)))
    if wrong:
        raise ConfigError(f"invalid type for {key}: {value!r} is {type(value).__name__}, "
                          f"expected {tp.__name__}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        listed = ", ".join(repr(u) for u in unknown)
        raise ConfigError(f"unknown config key(s) {listed} in {where}; "
                          f"valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid [{prefix or 'config'}]: {err}") from err


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_iters=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:  # a TOML literal: numbers, booleans, "strings", [lists]
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare string
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a table")
        node[path[-1]] = value
    return raw


def from_dict(raw: dict[str, Any]) -> Config:
    """A Config from nested dicts (a parsed TOML file); the top-level tables named after a
    registered method are that method's settings, built and validated by its own dataclass."""
    raw = dict(raw)
    if "method" in raw:
        sections = ", ".join(f"[{name}]" for name in sorted(method_registry()))
        raise ConfigError("the [method] section is gone: list the methods of the run as "
                          "methods = [\"sepico\", ...] and configure each in its own section "
                          f"({sections}); see docs/architecture.md")
    if "method_settings" in raw:
        raise ConfigError("unknown config key(s) 'method_settings' in the top level (method "
                          "settings are sections named after the method, e.g. [sepico])")
    st = raw.get("self_training")
    if isinstance(st, dict) and "imnet_feature_dist" in st:
        raise ConfigError("self_training.imnet_feature_dist is gone: DAFormer's ImageNet feature "
                          "distance is the method 'fdist' (methods = [..., \"fdist\"], its "
                          "lambda is [fdist] weight); remove the key")
    registry = method_registry()
    sections = {name: _coerce(raw.pop(name), registry[name].Settings, name)
                for name in list(raw) if name in registry}
    try:
        return _build(Config, {**raw, "method_settings": sections})
    except ConfigError as err:
        if "unknown config key" in str(err) and "the top level" in str(err):
            raise ConfigError(f"{err}; method sections: {', '.join(sorted(registry))}") from err
        raise


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            and k != "label_map" else v
    return out


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML file with its ``extends = "base.toml"`` (or a list) merged underneath it; paths are
    relative to the file that names them."""
    if not path.is_file():
        where = f" (extended by {seen[-1]})" if seen else ""
        raise ConfigError(f"config file not found: {path}{where}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'extends'")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (TOML files are UTF-8): byte "
                          f"{err.object[err.start]:#04x} at offset {err.start}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    bases = raw.pop("extends", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'extends' must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _deep_merge(merged, _read_toml(path.parent / base, (*seen, path.resolve())))
    return _deep_merge(merged, raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a TOML config file (with its ``extends`` bases), apply ``key=value`` overrides,
    validate, return a Config."""
    path = Path(path)
    raw = _read_toml(path)
    try:
        return from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def load_cli_config(path: str | Path, overrides: list[str] | None = None) -> Config | None:
    """``load_config`` for the command lines: a ConfigError is printed as one ``error:`` line on
    stderr and gives None (the caller exits with status 2)."""
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """Serialise a config as TOML (the resolved config written to each work dir)."""
    lines: list[str] = []

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{fmt(str(k))} = {fmt(x)}" for k, x in v.items()) + "}"
        return repr(v)

    def emit(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) or k == "label_map"}
        tables = {k: v for k, v in d.items() if isinstance(v, dict) and k != "label_map"}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in tables.items():
            emit(f"{prefix}.{k}" if prefix else k, v)

    tree = to_dict(cfg)
    tree.update(tree.pop("method_settings"))  # each method's section at the top level
    emit("", tree)
    return "\n".join(lines).lstrip("\n")
