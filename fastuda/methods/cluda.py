"""CLUDA: supervised pixel-to-pixel contrast inside the student-teacher loop.

The decoder's fused multi-level feature map (``"features"``: DAFormer's 256-channel fusion) is
L2-normalised and resized to a small grid (published 65x65, bilinear; labels nearest). Every valid
pixel of the grid is an anchor of ``ops.pixel_contrast`` (positives: the other pixels of its class
in the batch, negatives: the pixels of other classes; never an N x N matrix in memory), once on
the source batch with its ground truth and once on the mixed batch with the mixed labels, where
the pair weights are the outer product of the mixed pseudo-weights. The two losses count half
each. Features, labels and weights are flattened batch-major together (the op reads [B, D, h, w]
and [B, h, w]); ignore pixels are neither positives nor negatives.

Multi-resolution (HRDA, ``hrda.enabled``), ``cluda.multires_loss = "released"`` (the default):
the loss of the release (user0407/CLUDA bad6ed0), ``released_multires_contrast``:
- features (mmseg/models/decode_heads/hrda_head.py#L198-L203, #L240-L247): the context view's
  fused decoder map upsampled by 1 / context_scale (bilinear, align_corners=True) to the full
  grid, and the detail view's fused map pasted into a zero map of that size at the box; both
  resized to the grid (65x65) bilinear with align_corners=True, then L2-normalised
  (mmseg/models/uda/dacs.py#L322-L325, #L417-L420; contrastive_loss.py#L69-L74); labels nearest,
  the mixed pseudo-weights bilinear align_corners=True (dacs.py#L328-L329, #L413-L415);
- a (hrda_head.py#L98-L105, #L212, #L227): ``feat_weighter``, a head of the decode head's type
  with one output channel (DAFormer: ``cluda.head_channels``-wide embeddings, 1x1 conv fusion, as
  HRDA's scale attention) on the context view's decode-head input (``context_head_input``),
  sigmoid, upsampled by 1 / context_scale (align_corners=False), then bilinear to the grid;
- m_i (dacs.py#L330-L333): the anchor's cell lies in the detail box (box cells of the context
  grid, nearest to the grid);
- per anchor i (a context pixel; contrastive_loss.py#L9-L47, #L76-L98), with s_ij = f_i . f_j / tau
  (context/context) and t_ij = f_i . h_j / tau (context/detail: h the pasted detail map, a zero
  vector outside the box, as released), P_i the other pixels of i's class, N_i those of the
  other classes:
      l_i = -(1/max(|P_i|, 1)) sum_{j in P_i} q_i q_j [ w_ij (s_ij - log(e^s_ij + sum_{N_i} e^s_ik))
                                        + (1 - w_ij) (t_ij - log(e^t_ij + sum_{N_i} e^t_ik)) ]
  with w_ij = a_i a_j m_i (q = 1 on the source batch); the loss is the mean of l_i over all
  anchors (an anchor without positives counts 0).
Deliberate fixes (docs/recipes.md section 11), each with a key restoring the release: ignore
pixels are neither anchors, positives nor negatives (``cluda.ignore_as_class``); features,
labels and weights are flattened batch-major together (``cluda.pixel_major_features``); the box
test is the box, so road (train id 0) inside it counts as inside (``cluda.box_test``).

The mixed pass's detail box (HRDA mode, ``cluda.mixed_detail_crop = "max_entropy"``, released:
mmseg/models/uda/dacs.py#L400-L407, hrda_encoder_decoder.py#L181-L213, #L310-L329, #L356-L358):
from iteration ``max_entropy_start_iter`` (released ``local_iter > 12000``: 12001) on, the
student's mixed forward takes, per image, the detail box of largest mean entropy among HRDA's
slide windows (the detail crop at stride crop / 2: 3 x 3 windows of 512 on the 1024 crop), the
entropy of the student's own context prediction on the mixed image (its decode head run again on
the detached context features, in train mode), upsampled nearest to the crop's pixels
(fastuda/models/hrda.py ``max_entropy_boxes``). Before, and on the source pass always, HRDA's
random box (one per batch). The labels, weights, attention mask, pasted detail map and box mask
above follow each image's box. The release's window search overwrites the first window with
each new maximum (a fixed bug; ``cluda.max_entropy_overwrite`` restores it).

``cluda.multires_loss = "three_term"`` (fastuda before issue 13): the learned weighting of CLUDA,
"an extra 1-channel head with sigmoid output a_i". It is CLUDA's own head (``SigmoidMapHead``: 3x3
conv-BN-ReLU with ``cluda.head_channels`` hidden channels, 1x1 conv to one channel, sigmoid), a
submodule of this method (a loss-only head, see docs/architecture.md: the loop trains it with the
student at the head learning rate and checkpoints it with the method's state_dict). It is not
HRDA's scale attention: that one fuses the two predictions and learns from the segmentation loss;
pair weights taken from it would let the contrast push the fusion attention towards 0/1 against the
CE. The contrast never reads the fusion attention. The pixels are the context features on the grid
(labels of the whole crop, nearest) and the detail features on the same grid (labels cropped to the
detail box); a_i is the head on the features of the pixel's own view (``"features"`` for context
pixels, ``"features_detail"`` for detail pixels, each at its native resolution, then bilinear to
the grid), so the contrast loss trains the head (and, through it, the features) via the pair
weights. The head's BatchNorm normalises each view's batch separately; its parameters are outside
DDP's module, so the loop averages their gradients over the ranks.
Pair weights:
    w_ip = a_i a_p        both pixels of the same view (context/context, and detail/detail,
                          which CLUDA does not specify: we weight it like context/context)
    w_ip = 1 - a_i a_p    one context and one detail pixel,
times q_i q_p on the mixed batch (q: mixed pseudo-weights). ``ops.pixel_contrast`` only takes
w_ip = u_i u_p, but its loss is linear in w at fixed anchors and positives (neither depends on the
weights), and with r_i = +1 for context and -1 for detail pixels
    W = (q r a)(q r a)^T + 1/2 q q^T - 1/2 (q r)(q r)^T
exactly (same view: r_i r_p = 1, q q a a; cross: r_i r_p = -1, q q (1 - a a)), so
    L = L[u = q r a] + 1/2 L[u = q] - 1/2 L[u = q r]
is computed with three exact calls of the op (the [N, N] matrix is still never stored; the
second and third do not depend on a). No approximation; tests/methods/test_cluda_hrda.py checks
it against a per-pair loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..config import Config, ConfigError, _check
from ..engine.context import MethodContext
from ..models import outputs as O
from ..models.heads import SigmoidMapHead
from ..models.hrda import box_rows, crop_to_box, scale_attention_head
from .base import Losses, Method, Outputs


@dataclass
class CLUDASettings:
    """``[cluda]``: pixel-to-pixel contrast on the fused decoder features (source and mixed)."""

    weight: float = 1.0  # each of the two losses counts weight / 2
    tau: float = 1.0
    grid: list[int] = field(default_factory=lambda: [65, 65])  # (height, width)
    # hidden channels of the pair-weight head (HRDA mode only; released: the feat_weighter's
    # channels = attention_embed_dim 256, user0407/CLUDA hrda_head.py#L72-L73)
    head_channels: int = 256
    # HRDA mode: "released" (user0407/CLUDA contrastive_loss.py#L49-L99, module docstring) or
    # "three_term" (fastuda before issue 13: both views on their own grids, detail/detail pairs,
    # a per-view SigmoidMapHead, mean over anchors with a positive)
    multires_loss: Literal["released", "three_term"] = "released"
    # the release's bugs, restorable ("released" loss only; docs/recipes.md section 11):
    # 255 as a class of its own (contrastive_loss.py#L23)
    ignore_as_class: bool = False
    # features flattened pixel-major against batch-major labels (contrastive_loss.py#L11, #L53)
    pixel_major_features: bool = False
    # "box": the anchor's cell is in the detail box; "label_nonzero": released
    # mix_mask = (box_mask * label != 0), road inside the box counts as outside (dacs.py#L332)
    box_test: Literal["box", "label_nonzero"] = "box"
    # anchors per chunk of the released loss (memory: chunk x N similarities, recomputed in the
    # backward; no effect on the value)
    chunk: int = 1024
    # HRDA mode: the detail box of the student's mixed pass. "max_entropy" (released): from
    # iteration max_entropy_start_iter on, per image the slide window with the largest mean
    # entropy of the student's context prediction (dacs.py#L400-L407,
    # hrda_encoder_decoder.py#L181-L213, #L310-L329, #L356-L358); before it, and with
    # "random", HRDA's random box
    mixed_detail_crop: Literal["max_entropy", "random"] = "max_entropy"
    # the first (0-based) iteration with the maximum-entropy box: released local_iter > 12000
    max_entropy_start_iter: int = 12001
    # the release's window search writes each new maximum's entropy over the first window, so
    # the later windows overlapping it are scored on those values (hrda_encoder_decoder.py
    # #L201-L212; docs/recipes.md section 11); true restores it
    max_entropy_overwrite: bool = False

    def __post_init__(self) -> None:
        _check(self.tau > 0, "cluda.tau", self.tau, "> 0")
        _check(self.weight >= 0, "cluda.weight", self.weight, ">= 0")
        _check(len(self.grid) == 2 and min(self.grid) > 0, "cluda.grid", self.grid,
               "two positive integers (height, width)")
        _check(self.head_channels >= 1, "cluda.head_channels", self.head_channels, ">= 1")
        _check(self.chunk >= 1, "cluda.chunk", self.chunk, ">= 1")
        for key in ("ignore_as_class", "pixel_major_features"):
            _check(self.multires_loss == "released" or not getattr(self, key), f"cluda.{key}",
                   getattr(self, key), "false with cluda.multires_loss = 'three_term' (a key of "
                   "the released loss)")
        _check(self.multires_loss == "released" or self.box_test == "box", "cluda.box_test",
               self.box_test, "'box' with cluda.multires_loss = 'three_term' (a key of the "
               "released loss)")
        _check(self.max_entropy_start_iter >= 0, "cluda.max_entropy_start_iter",
               self.max_entropy_start_iter, ">= 0")
        _check(self.mixed_detail_crop == "max_entropy" or not self.max_entropy_overwrite,
               "cluda.max_entropy_overwrite", self.max_entropy_overwrite,
               "false with cluda.mixed_detail_crop = 'random' (a key of the maximum-entropy "
               "box)")


def to_grid(feats: Tensor, labels: Tensor, weights: Tensor | None, grid: tuple[int, int]
            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Unit-norm features resized to ``grid`` (bilinear), labels and weights (nearest)."""
    f = F.interpolate(F.normalize(feats.float(), dim=1), size=grid, mode="bilinear",
                      align_corners=False)
    lbl = F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0].long()
    w = None if weights is None else F.interpolate(weights[:, None].float(), size=grid,
                                                   mode="nearest")[:, 0]
    return f, lbl, w


class CLUDA(Method):
    """In HRDA mode (``ctx.multi_resolution``) CLUDA builds the multi-resolution pair-weight
    head (``weight_head``): released, a 1-channel head of the decode head's type on the context
    decode-head input; "three_term", a SigmoidMapHead on the ``ctx.feature_channels``-channel
    features it contrasts. Single resolution: no head, no parameters."""

    name = "cluda"
    Settings = CLUDASettings
    needs_self_training = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.self_training.mix != "classmix":
            raise ConfigError("methods = [..., 'cluda'] contrasts the mixed batch: set "
                              "self_training.mix = 'classmix'")
        st: CLUDASettings = cfg.settings("cluda")
        if not cfg.hrda.enabled and (st.ignore_as_class or st.pixel_major_features
                                     or st.box_test != "box"):
            raise ConfigError("cluda.ignore_as_class, cluda.pixel_major_features and "
                              "cluda.box_test are keys of the released multi-resolution loss: "
                              "they need hrda.enabled = true")
        if not cfg.hrda.enabled and st.max_entropy_overwrite:
            raise ConfigError("cluda.max_entropy_overwrite is a key of HRDA's maximum-entropy "
                              "detail box: it needs hrda.enabled = true")

    def __init__(self, settings: CLUDASettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.num_classes, self.backend = ctx.num_classes, ctx.backend
        self.ignore_index = ctx.ignore_index
        self.grid = (int(settings.grid[0]), int(settings.grid[1]))
        self.weight_head = None
        self.context_scale = float(ctx.context_scale)
        self.released = ctx.multi_resolution and settings.multires_loss == "released"
        if self.released:
            # the release's feat_weighter: a head of the decode head's type, one output channel,
            # on the context decode-head input (user0407/CLUDA hrda_head.py#L72-L80, #L98-L105)
            if ctx.decode_head is None:
                raise ValueError("CLUDA's released pair-weight head is a head of the network's "
                                 "decode-head type: the context needs the decode head")
            self.weight_head = scale_attention_head(ctx.decode_head, 1, settings.head_channels)
        elif ctx.multi_resolution:
            if ctx.feature_channels <= 0:
                raise ValueError("CLUDA in HRDA mode builds a pair-weight head on the features: "
                                 "the context needs the network's feature_channels")
            self.weight_head = SigmoidMapHead(ctx.feature_channels, settings.head_channels)

    def mixed_box_rule(self, it: int) -> str | None:
        """HRDA's box rule for the mixed pass: the maximum-entropy box from
        ``max_entropy_start_iter`` on (``mixed_detail_crop = "max_entropy"``), else None (HRDA's
        random box). Independent of ``weight``: in the release it is part of the mixed pass,
        not of the contrast."""
        st = self.settings
        if not self.ctx.multi_resolution or st.mixed_detail_crop == "random" \
                or it < st.max_entropy_start_iter:
            return None
        return "max_entropy_overwrite" if st.max_entropy_overwrite else "max_entropy"

    def pair_weight(self, feats: Tensor) -> Tensor:
        """a [B, h, w] on the grid: the pair-weight head on ``feats`` [B, D, h', w'], bilinear."""
        if self.weight_head is None:
            raise RuntimeError("CLUDA: the multi-resolution contrast needs the pair-weight head; "
                               "CLUDA builds it when its context is multi-resolution (HRDA)")
        a = self.weight_head(feats).float()
        return F.interpolate(a, size=self.grid, mode="bilinear", align_corners=False)[:, 0]

    def contrast(self, feats: Tensor, labels: Tensor, pair_weights: Tensor | None = None
                 ) -> Tensor:
        """pixel_contrast of ``feats`` [B, D, h, w] with full-resolution ``labels`` [B, H, W]
        (and per-pixel pair weights [B, H, W]) on the configured grid."""
        f, lbl, w = to_grid(feats, labels, pair_weights, self.grid)
        return ops.pixel_contrast(f, lbl, tau=self.settings.tau, pair_weights=w,
                                  ignore_index=self.ignore_index, backend=self.backend)

    def contrast_multires(self, out: Outputs, labels: Tensor, weights: Tensor | None = None
                          ) -> Tensor:
        """The multi-resolution contrast of HRDA outputs (see the module docstring): context
        and detail pixels on the grid, a from this method's pair-weight head on each view's
        features, pair weights a_i a_p within a view and 1 - a_i a_p across views (times the
        pixel weights' product), as three exact ``pixel_contrast`` calls."""
        box = out[O.DETAIL_BOX]  # one box for the batch, or one per image
        f_c, l_c, q_c = to_grid(out[O.FEATURES], labels, weights, self.grid)
        f_d, l_d, q_d = to_grid(out[O.FEATURES_DETAIL], crop_to_box(labels, box),
                                None if weights is None else crop_to_box(weights, box), self.grid)
        a_c = self.pair_weight(out[O.FEATURES])
        a_d = self.pair_weight(out[O.FEATURES_DETAIL])
        feats, lbl = torch.cat([f_c, f_d]), torch.cat([l_c, l_d])
        a = torch.cat([a_c, a_d])
        r = torch.cat([torch.ones_like(a_c), -torch.ones_like(a_d)])
        q = None if weights is None else torch.cat([q_c, q_d])
        return multires_pair_contrast(feats, lbl, a, r, q, tau=self.settings.tau,
                                      ignore_index=self.ignore_index, backend=self.backend)

    def released_inputs(self, out: Outputs, labels: Tensor, weights: Tensor | None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The released loss's inputs on the grid (module docstring): unit context and pasted
        detail features [B, D, h, w], labels, a, m (1 inside the box) [B, h, w], q or None."""
        grid, up = self.grid, round(1.0 / self.context_scale)
        B = labels.shape[0]
        boxes = box_rows(out[O.DETAIL_BOX], B)  # per image (hrda_head.py#L243-L245 with a list)
        f_lr = F.interpolate(out[O.FEATURES].float(), scale_factor=up, mode="bilinear",
                             align_corners=True)
        fd = out[O.FEATURES_DETAIL].float()
        s = labels.shape[-2] // f_lr.shape[-2]  # the features' stride in input pixels
        f_hr = f_lr.new_zeros(f_lr.shape)
        for b, (y1, y2, x1, x2) in enumerate(boxes):
            cell = f_hr[b, :, y1 // s:y2 // s, x1 // s:x2 // s]
            if tuple(cell.shape) != tuple(fd.shape[1:]):
                raise ValueError(f"CLUDA: the detail features {tuple(fd.shape)} do not fill the "
                                 f"box {(y1, y2, x1, x2)} at stride {s} of the "
                                 f"{tuple(f_lr.shape)} map")
            f_hr[b, :, y1 // s:y2 // s, x1 // s:x2 // s] = fd[b]

        def bilinear(x: Tensor) -> Tensor:
            return F.interpolate(x, size=grid, mode="bilinear", align_corners=True)

        f_c = F.normalize(bilinear(f_lr), dim=1)
        f_d = F.normalize(bilinear(f_hr), dim=1)  # zero vectors stay zero
        lbl = F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0].long()
        ctx_grid = tuple(out[O.LOGITS_CONTEXT].shape[-2:])
        logit = self.weight_head(out[O.CONTEXT_HEAD_INPUT])
        logit = logit[0] if isinstance(logit, tuple) else logit  # DAFormer: (logits, fused)
        if tuple(logit.shape[-2:]) != ctx_grid:
            logit = F.interpolate(logit, size=ctx_grid, mode="bilinear", align_corners=False)
        a = F.interpolate(torch.sigmoid(logit.float()), scale_factor=up, mode="bilinear",
                          align_corners=False)
        a = bilinear(a)[:, 0]
        # the box's cells of the context grid (hrda_head.py#L213-L221), nearest to the grid
        al = labels.shape[-2] // ctx_grid[0]
        mask = a.new_zeros((B, 1, *ctx_grid))
        for b, (y1, y2, x1, x2) in enumerate(boxes):
            mask[b, :, y1 // al:y2 // al, x1 // al:x2 // al] = 1
        m = F.interpolate(mask, size=grid, mode="nearest")[:, 0]
        if self.settings.box_test == "label_nonzero":  # released: box_mask * label != 0
            m = m * (lbl != 0).to(m.dtype)
        q = None if weights is None else bilinear(weights[:, None].float())[:, 0]
        return f_c, f_d, lbl, a, m, q

    def _loss(self, out: Outputs, labels: Tensor, weights: Tensor | None) -> Tensor:
        if O.DETAIL_BOX in out and O.FEATURES_DETAIL in out:
            if self.released:
                st = self.settings
                return released_multires_contrast(
                    *self.released_inputs(out, labels, weights), tau=st.tau,
                    ignore_index=self.ignore_index, ignore_as_class=st.ignore_as_class,
                    pixel_major_features=st.pixel_major_features, chunk=st.chunk)
            return self.contrast_multires(out, labels, weights)
        return self.contrast(out[O.FEATURES], labels, weights)

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        if self.settings.weight == 0:
            return {}
        return {"src.contrast": 0.5 * self.settings.weight * self._loss(out, label, None)}

    def mixed_losses(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                     it: int) -> Losses:
        if self.settings.weight == 0:
            return {}
        loss = self._loss(out, mixed_label, mixed_weight)
        return {"mix.contrast": 0.5 * self.settings.weight * loss}


def multires_pair_contrast(feats: Tensor, labels: Tensor, a: Tensor, r: Tensor,
                           q: Tensor | None = None, *, tau: float, ignore_index: int = 255,
                           backend: str = "auto") -> Tensor:
    """``pixel_contrast`` with pair weights w_ip = q_i q_p a_i a_p when r_i = r_p and
    w_ip = q_i q_p (1 - a_i a_p) when r_i != r_p (r in {+1, -1} per pixel; q = 1 if None):
    W = (q r a)(q r a)^T + 1/2 q q^T - 1/2 (q r)(q r)^T, three exact calls (the loss is linear in
    the pair weights; anchors and positive counts do not depend on them)."""
    def call(u: Tensor | None) -> Tensor:
        return ops.pixel_contrast(feats, labels, tau=tau, pair_weights=u,
                                  ignore_index=ignore_index, backend=backend)

    qa = a * r if q is None else q * r * a
    qr = r if q is None else q * r
    return call(qa) + 0.5 * call(q) - 0.5 * call(qr)


def _released_rows(f_rows: Tensor, f_c: Tensor, f_d: Tensor, y_rows: Tensor, y: Tensor,
                   valid: Tensor, rows: Tensor, a_rows: Tensor, a: Tensor, m_rows: Tensor,
                   q_rows: Tensor | None, q: Tensor | None, tau: float) -> Tensor:
    """The released numerators sum_j in P_i q_i q_j [w cc + (1 - w) cd] of the anchors ``rows``
    (see released_multires_contrast), [R]."""
    same = y_rows[:, None] == y[None]
    col = valid[None].expand_as(same)
    pos = same & col
    pos[torch.arange(rows.numel(), device=rows.device), rows] = False  # no self pair
    neg = (~same & col).to(f_rows.dtype)

    def log_prob(sim: Tensor) -> Tensor:
        # l_ij - log(exp(l_ij) + sum_neg exp(l_ik)), shifted by the row max for stability
        sim = sim - sim.masked_fill(~col, float("-inf")).amax(1, keepdim=True).detach()
        e = sim.exp()
        return sim - torch.log(e + (e * neg).sum(1, keepdim=True))

    w = a_rows[:, None] * a[None] * m_rows[:, None]
    term = w * log_prob(f_rows @ f_c.T / tau) + (1 - w) * log_prob(f_rows @ f_d.T / tau)
    if q is not None and q_rows is not None:
        term = term * (q_rows[:, None] * q[None])
    return torch.where(pos, term, torch.zeros((), dtype=term.dtype, device=term.device)).sum(1)


def released_multires_contrast(f_c: Tensor, f_d: Tensor, labels: Tensor, a: Tensor, m: Tensor,
                               q: Tensor | None = None, *, tau: float = 1.0,
                               ignore_index: int = 255, ignore_as_class: bool = False,
                               pixel_major_features: bool = False, chunk: int = 1024) -> Tensor:
    """CLUDA's released multi-resolution loss (user0407/CLUDA contrastive_loss.py#L9-L99, without
    the final 0.5: the caller weighs it) on grid inputs: unit context features ``f_c`` and detail
    features ``f_d`` [B, D, h, w] (the pasted map: zero outside the box), ``labels``, pair-weight
    map ``a``, box mask ``m`` and pixel weights ``q`` [B, h, w].

    Anchor i (a context pixel), positives P_i (other pixels of its class), negatives (the other
    classes), w_ij = a_i a_j m_i: l_i = -(1/max(|P_i|, 1)) sum_{j in P_i} q_i q_j [w_ij cc_ij +
    (1 - w_ij) cd_ij], cc on context/context similarities, cd on context/detail ones, each
    log(e^l / (e^l + sum_neg e^l_k)); the mean of l_i over every anchor. Anchors and pixels are
    those whose label is not ``ignore_index`` (``ignore_as_class``: every pixel, 255 a class as
    released). ``pixel_major_features``: the features flattened pixel-major against batch-major
    labels and weights, as released (contrastive_loss.py#L11). Computed ``chunk`` anchors at a
    time, each chunk recomputed in the backward, so no [N, N] matrix is kept."""
    B, D = f_c.shape[:2]

    def rows_of(f: Tensor) -> Tensor:
        f = f.flatten(2).transpose(1, 2)  # [B, P, D]
        return (f.transpose(0, 1) if pixel_major_features else f).reshape(-1, D)

    fc, fd = rows_of(f_c), rows_of(f_d)
    y, av, mv = labels.reshape(-1), a.reshape(-1), m.reshape(-1).to(fc.dtype)
    qv = None if q is None else q.reshape(-1).to(fc.dtype)
    valid = torch.ones_like(y, dtype=torch.bool) if ignore_as_class else y != ignore_index
    anchors = valid.nonzero()[:, 0]
    if anchors.numel() == 0:
        return fc.sum() * 0.0
    # |P_i|: the other valid pixels of i's class
    _, inverse, counts = torch.unique(y[anchors], return_inverse=True, return_counts=True)
    den = (counts[inverse] - 1).clamp_min(1).to(fc.dtype)
    total = fc.new_zeros(())
    for start in range(0, anchors.numel(), chunk):
        rows = anchors[start:start + chunk]
        args = (fc[rows], fc, fd, y[rows], y, valid, rows, av[rows], av, mv[rows],
                None if qv is None else qv[rows], qv, float(tau))
        if torch.is_grad_enabled():
            num = checkpoint(_released_rows, *args, use_reentrant=False)
        else:
            num = _released_rows(*args)
        total = total + (num / den[start:start + chunk]).sum()
    return -total / anchors.numel()


__all__ = ["CLUDA", "multires_pair_contrast", "released_multires_contrast", "to_grid"]
