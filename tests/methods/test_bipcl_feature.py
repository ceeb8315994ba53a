"""The feature BiPCL contrasts in the DASS release: DeepLab-V2's four ASPP branch outputs
concatenated (cvlab-yonsei/DASS model/DeeplabV2.py#L109-L115, 4 x 19 = 76 channels)."""

from __future__ import annotations

import torch

from fastuda.models import outputs as O
from fastuda.models.deeplabv2 import DeepLabV2


def test_deeplabv2_outputs_the_aspp_branches_whose_sum_is_the_logits() -> None:
    torch.manual_seed(0)
    model = DeepLabV2("resnet18", num_classes=5, projection=False, output_stride=16).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        c4 = out[O.FEATURES]
        # independent expectation: each dilated conv applied to layer 4 by hand, in order
        expected = torch.cat([conv(c4) for conv in model.decode_head.convs], 1)
        logits = model.decode_head(c4)
    assert out[O.ASPP_BRANCHES].shape == (1, 4 * 5, 4, 4)
    assert torch.allclose(out[O.ASPP_BRANCHES], expected, atol=1e-6)
    assert torch.allclose(out[O.LOGITS], logits, atol=1e-6)
    assert torch.allclose(out[O.ASPP_BRANCHES].view(1, 4, 5, 4, 4).sum(1), logits, atol=1e-5)
