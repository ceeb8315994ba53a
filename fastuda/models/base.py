"""SegModel: what every segmentation network of fastuda offers the trainer and the methods.

A model is a ``backbone`` plus heads. ``forward`` returns a dict of named outputs so a method reads
what it needs (logits, embeddings, fused features) without touching model code; the names are
the constants of fastuda/models/outputs.py:

- ``logits``      [B, num_classes, H/s, W/s]  (s = ``output_stride``; the trainer upsamples)
- ``embeddings``  [B, embed_dim, h, w], unit L2 norm along channels (only with a projection head)
- ``features``    the feature map the classifier reads (DAFormer: fused decoder map, DeepLab-V2:
                  layer-4 output)
- ``backbone``    the last backbone stage (ImageNet feature distance compares it)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import outputs as O

# mmseg's paramwise custom_keys of the DAFormer lineage ({'head': lr_mult 10, 'pos_block':
# decay_mult 0, 'norm': decay_mult 0}; BIT-DA/SePiCo experiments.py#L157-L161, lhoyer/DAFormer
# configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py#L39-L45) in the
# order mmcv tries them: longest first, then alphabetical; the first key the parameter's name
# contains decides (mmcv DefaultOptimizerConstructor.add_params), so "head" wins over "norm"
_MMSEG_CUSTOM_KEYS = ("pos_block", "head", "norm")


def mmseg_no_decay(name: str) -> bool:
    """The released rule: no weight decay for a parameter whose name contains ``pos_block`` or
    ``norm`` unless ``head`` decides first; biases and BatchNorm ``bn*`` parameters are decayed.
    For fastuda's models that is MiT's LayerNorms only (ResNet's BNs are ``bn*``, heads' names
    contain ``head``)."""
    for key in _MMSEG_CUSTOM_KEYS:
        if key in name:
            return key != "head"
    return False


def frozen_norm_layers(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers (SyncBatchNorm too) that ``model.freeze_bn`` keeps in eval mode: those
    of the backbone of every ``SegModel`` inside ``module`` whose ``freeze_bn`` is set. Looked up
    when asked, so a SyncBatchNorm conversion after building is covered."""
    out: list[nn.Module] = []
    for sub in module.modules():
        if isinstance(sub, SegModel) and sub.freeze_bn:
            out += [m for m in sub.backbone.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return out


class SegModel(nn.Module):
    """Base class; subclasses set ``backbone``, heads and the three size attributes."""

    # which parameters get no weight decay (optim.no_decay; build_network sets it): "mmseg" the
    # released name rule (``mmseg_no_decay``), "1d" every one-dimensional parameter
    no_decay: str = "mmseg"
    # model.freeze_bn (build_model sets it): the backbone's BatchNorm layers stay in eval mode
    freeze_bn: bool = False

    output_stride: int
    embed_dim: int  # channels of "embeddings"; 0 when the model has no projection head
    num_classes: int
    feature_channels: int  # channels of "features"

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last

    def train(self, mode: bool = True) -> SegModel:
        """``nn.Module.train``, except that with ``freeze_bn`` the backbone's BatchNorm layers stay
        in eval mode: they normalise with their running statistics and never update them (every
        training step calls ``train()``, so the freeze has to live here)."""
        super().train(mode)
        for m in frozen_norm_layers(self):
            m.eval()
        return self

    def _prepare(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects images [B, 3, H, W], "
                             f"got shape {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def backbone_output(self, images: Tensor) -> Tensor:
        """The ``backbone`` output of ``images`` (the last backbone stage); models whose heads
        do not feed it skip them (fdist runs a frozen copy for this output only)."""
        return self(images)[O.BACKBONE]

    def backbone_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if n.startswith("backbone.")]

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
        """Optimiser groups: backbone at ``lr``, everything else (heads) at ``lr * head_lr_mult``.

        ``no_decay = "mmseg"``: the parameters ``mmseg_no_decay`` names (MiT's norms) get no weight
        decay, ``"1d"``: every one-dimensional parameter (biases and the weights of
        BatchNorm/LayerNorm); all others get ``weight_decay``. Each group carries ``name`` and
        ``lr_mult`` (its lr relative to ``lr``) so schedulers can rescale it. Frozen parameters
        and empty groups are left out.
        """
        if self.no_decay not in ("mmseg", "1d"):
            raise ValueError(f"no_decay must be 'mmseg' or '1d', got {self.no_decay!r}")
        buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            part = "backbone" if name.startswith("backbone.") else "head"
            exempt = mmseg_no_decay(name) if self.no_decay == "mmseg" else p.ndim <= 1
            buckets.setdefault((part, exempt), []).append(p)
        groups = []
        for part in ("backbone", "head"):
            mult = 1.0 if part == "backbone" else head_lr_mult
            for no_decay in (False, True):
                params = buckets.get((part, no_decay))
                if params:
                    groups.append({"params": params, "lr": lr * mult, "lr_mult": mult,
                                   "weight_decay": 0.0 if no_decay else weight_decay,
                                   "name": part + ("_no_decay" if no_decay else "")})
        return groups
