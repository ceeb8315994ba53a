"""Segmentation models: DeepLab-V2 (ResNet), DAFormer (MiT) and DINOv2 ViTs (timm, the ``vit``
extra), one ``build_model(config)`` entry,
and ``build_network(config)``: the network a run trains and evaluates (the model, wrapped in the
HRDA multi-resolution ``HRDAModel`` when ``hrda.enabled``).

Every model is a :class:`SegModel` whose forward returns a dict of named outputs (see base.py).
Pretrained weights come only from local files (``model.pretrained = "PATH"``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fastuda.config import Config, ModelConfig

from .base import SegModel
from .daformer import DAFormer
from .deeplabv2 import DeepLabV2
from .hrda import HRDAModel
from .mit import MIT_SPECS, MixTransformer
from .pretrained import load_pretrained
from .resnet import RESNET_SPECS, ResNet
from .vit import VIT_SPECS, ViTSegModel


def build_model(cfg: ModelConfig, load_weights: bool = True) -> SegModel:
    """Build the model ``cfg`` describes, load ``cfg.pretrained`` if set (and ``load_weights``:
    callers that load a trained checkpoint next skip it), apply channels_last.

    The pretrained-loading report is kept as ``model.pretrained_report`` (None without weights).
    """
    model: SegModel  # ModelConfig has checked that the backbone is one of the model's
    if cfg.name == "deeplabv2":
        model = DeepLabV2(cfg.backbone, cfg.num_classes, projection=cfg.projection,
                          embed_dim=cfg.embed_dim, channels_last=cfg.channels_last,
                          output_stride=cfg.output_stride or 8)
    elif cfg.name == "daformer":
        model = DAFormer(cfg.backbone, cfg.num_classes, decoder_channels=cfg.decoder_channels,
                         projection=cfg.projection, embed_dim=cfg.embed_dim,
                         drop_path=cfg.drop_path, dropout=cfg.dropout,
                         channels_last=cfg.channels_last)
    elif cfg.name == "vit":
        model = ViTSegModel(cfg.backbone, cfg.num_classes, head=cfg.vit_head,
                            decoder_channels=cfg.decoder_channels, projection=cfg.projection,
                            embed_dim=cfg.embed_dim, drop_path=cfg.drop_path,
                            dropout=cfg.dropout, input_mode=cfg.vit_input,
                            resize_scale=cfg.vit_resize_scale,
                            grad_checkpointing=cfg.grad_checkpointing,
                            layer_decay=cfg.layer_decay, channels_last=cfg.channels_last)
    else:
        raise ValueError(f"unknown model.name {cfg.name!r}; expected 'deeplabv2', 'daformer' or "
                         f"'vit'")
    model.pretrained_report = (load_pretrained(model, cfg.pretrained, cfg.pretrained_channels)
                               if cfg.pretrained and load_weights else None)
    model.freeze_bn = cfg.freeze_bn  # SPCL's release: backbone BN in eval mode (SegModel.train)
    if cfg.freeze_bn_affine:  # CorDA's release: backbone BN weights/biases fixed, stats not
        for m in model.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_network(cfg: Config, load_weights: bool = True) -> nn.Module:
    """``build_model(cfg.model, load_weights)``, inside an :class:`HRDAModel` when
    ``cfg.hrda.enabled``."""
    model = build_model(cfg.model, load_weights)
    model.no_decay = cfg.optim.no_decay  # its param_groups' weight-decay rule
    if cfg.hrda.enabled:
        hrda = HRDAModel(model, cfg.hrda)
        if cfg.model.channels_last:
            hrda.attention_head.to(memory_format=torch.channels_last)
        return hrda
    return model


class PretrainedError(ValueError):
    """``model.pretrained`` cannot be loaded into the model; the message names the file and why."""


def check_pretrained(cfg: ModelConfig) -> None:
    """Load ``cfg.pretrained`` (when set) into the model built on the meta device: every check of
    the real load (file readable, a known format that fits the model, key names, shapes) at the
    cost of reading the file, before a run does any work. Raises PretrainedError."""
    if not cfg.pretrained:
        return
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real load reports missing keys once
            load_pretrained(build_model(cfg, load_weights=False), cfg.pretrained,
                            cfg.pretrained_channels)
    except (OSError, ValueError, RuntimeError) as err:
        why = " ".join(str(err).split())  # one line: torch's reader errors span several
        raise PretrainedError(f"model.pretrained = {cfg.pretrained!r}: {why}") from None


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm with SyncBatchNorm (multi-GPU training on CUDA only)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


__all__ = ["DAFormer", "DeepLabV2", "HRDAModel", "MIT_SPECS", "MixTransformer", "RESNET_SPECS",
           "PretrainedError", "ResNet", "SegModel", "VIT_SPECS", "ViTSegModel", "build_model",
           "build_network", "check_pretrained", "convert_sync_batchnorm", "load_pretrained"]
