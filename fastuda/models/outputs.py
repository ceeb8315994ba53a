"""The names of a network's outputs: every model's forward returns a dict keyed by these, and
the loop and the methods read them by these names only (docs/architecture.md, "Model outputs").

Shapes: s is the model's output stride; HRDA's outputs are described in fastuda/models/hrda.py.
"""

from __future__ import annotations

# every SegModel
LOGITS = "logits"  # [B, num_classes, H/s, W/s]; the trainer upsamples
EMBEDDINGS = "embeddings"  # [B, embed_dim, h, w], unit L2 norm (only with a projection head)
FEATURES = "features"  # the map the classifier reads (DAFormer: fused decoder, DeepLab-V2: layer 4)
BACKBONE = "backbone"  # the last backbone stage
# DeepLab-V2: the ASPP branch outputs concatenated [B, 4 * num_classes, H/s, W/s] (their sum is
# the logits); the feature DASS/BiPCL contrasts (cvlab-yonsei/DASS model/DeeplabV2.py#L109-L115)
ASPP_BRANCHES = "aspp_branches"

# HRDA (fastuda/models/hrda.py)
LOGITS_CONTEXT = "logits_context"  # context view, context grid
LOGITS_DETAIL = "logits_detail"  # training: the detail box; eval: stitched on the full grid
ATTENTION = "attention"  # the scale attention used in the fusion, full grid
ATTENTION_CONTEXT = "attention_context"  # the attention head's output on the context grid
ATTENTION_DETAIL = "attention_detail"  # training: the attention inside the detail box
FEATURES_DETAIL = "features_detail"  # training: the detail view's features
# training: int64 [4] (y1, y2, x1, x2) in input pixels, one box for the batch (HRDA's draw), or
# [B, 4], one per image (CLUDA's maximum-entropy box); fastuda/models/hrda.py crop_to_box
DETAIL_BOX = "detail_box"
# training: the decode head's input of the context view (a tensor, or the list of backbone stages
# a DAFormer head reads); the scale attention and CLUDA's pair-weight head read it
CONTEXT_HEAD_INPUT = "context_head_input"

# CorDA (fastuda/methods/corda.py)
DEPTH_SOURCE = "depth_source"  # [B, h, w] inverse depth, the source-domain head
DEPTH_TARGET = "depth_target"  # [B, h, w] inverse depth, the target-domain head
# CorDA's released deep supervision: the initial predictions, before the cross-task exchange
LOGITS_INITIAL = "logits_initial"  # [B, num_classes, h, w], the wrapped model's logits
DEPTH_SOURCE_INITIAL = "depth_source_initial"  # [B, h, w]
DEPTH_TARGET_INITIAL = "depth_target_initial"  # [B, h, w]

__all__ = ["ASPP_BRANCHES", "ATTENTION", "ATTENTION_CONTEXT", "ATTENTION_DETAIL", "BACKBONE",
           "CONTEXT_HEAD_INPUT", "DEPTH_SOURCE", "DEPTH_SOURCE_INITIAL", "DEPTH_TARGET",
           "DEPTH_TARGET_INITIAL", "DETAIL_BOX", "EMBEDDINGS", "FEATURES", "FEATURES_DETAIL",
           "LOGITS", "LOGITS_CONTEXT", "LOGITS_DETAIL", "LOGITS_INITIAL"]
