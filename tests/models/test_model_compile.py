"""torch.compile on CPU: the whole model traces as one graph (no graph breaks) and the compiled
model computes what the eager one does. The AOT-eager backend checks capture, functionalisation and
the backward graph in seconds; the inductor test generates and compiles C++ (tens of seconds)."""

from __future__ import annotations

import pytest
import torch

from fastuda.config import ModelConfig
from fastuda.models import build_model


@pytest.mark.parametrize("name,backbone", [("deeplabv2", "resnet18"), ("daformer", "mit_b0")])
def test_compiles_as_one_graph_forward_and_backward(name: str, backbone: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, backbone=backbone, drop_path=0.0, dropout=0.0))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    out = compiled(x)
    ref = model(x)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-4)
    (out["logits"].mean() + out["embeddings"].mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (ref["logits"].mean() + ref["embeddings"].mean()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.slow
def test_inductor_on_cpu() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="daformer", backbone="mit_b0")).eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], atol=1e-4, rtol=1e-4)
