"""Non-finite updates: the optimiser step is taken only when the gradients are finite, and the
parameters are checked after it, so NaN/Inf never reach a checkpoint unnoticed.

A finite loss does not imply finite gradients (an overflow inside a backward), and finite
gradients with a finite learning rate give a finite AdamW or SGD update; the parameter check
after the step is the last line: a non-finite parameter stops the run before anything is saved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class NonFiniteParameters(RuntimeError):
    """An optimiser step left NaN/Inf in the parameters (nothing was checkpointed)."""


def total_grad_norm(params: Sequence[Tensor]) -> Tensor:
    """The 2-norm of all gradients (a 0-d tensor, no host sync; NaN/Inf if any gradient is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """One fused pass (a norm per tensor) and one host sync: True when no element is NaN/Inf."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    norms = torch._foreach_norm([t.detach() for t in tensors], ord=float("inf"))
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def guarded_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 params: Sequence[Tensor], grad_clip: float) -> bool:
    """Unscale, clip (``grad_clip`` > 0), step and update the scaler; True when the step was taken.

    A non-finite gradient norm skips the step (the gradients are dropped) and returns False: the
    caller counts it like a non-finite loss. Under fp16 the scaler's own check does this (and
    lowers the scale). Raises NonFiniteParameters when the step left a non-finite parameter."""
    # (fp16 without clipping: the gradients stay scaled and GradScaler skips non-finite steps)
    if not (scaler.is_enabled() and grad_clip <= 0):
        scaler.unscale_(optimizer)
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            norm = total_grad_norm(params)
        if not bool(torch.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
            return False
    scaler.step(optimizer)
    scaler.update()
    if not all_finite(params):
        raise NonFiniteParameters("the optimiser step made parameters non-finite with finite "
                                  "gradients (check optim.lr and the other optim.* values)")
    return True
