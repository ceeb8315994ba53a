"""torchrun integration: process group set-up from the environment torchrun provides, the DDP
wrapper of the student, and the few collectives the loop needs outside DDP itself.

    torchrun --standalone --nproc_per_node=N -m fastuda.train CONFIG        (one machine)
    torchrun --nnodes=M --node_rank=R --rdzv_endpoint=HOST:PORT --nproc_per_node=N -m fastuda.train

NCCL on GPU, gloo on CPU. Rank 0 logs, evaluates into the record and writes checkpoints; every rank
runs the step and the evaluation (whose confusion matrices are summed over ranks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except KeyError as err:
        raise RuntimeError(f"WORLD_SIZE={world} is set but {err.args[0]} is not: launch "
                           "multi-process runs with torchrun") from None
    if not is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def wrap_student(model: nn.Module, info: DistInfo, device: torch.device
                 ) -> tuple[nn.Module, nn.Module | None]:
    """(model on ``device``, its DDP wrapper or None when not distributed).

    On CUDA the BatchNorm layers become SyncBatchNorm (statistics over the global batch); gloo has
    no SyncBatchNorm, so on CPU each rank normalises with its own batch. ``find_unused_parameters``
    because a step may leave heads unused (the projection head before a method's start_iter, and
    in the passes whose losses do not read the embeddings)."""
    if info.enabled and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if not info.enabled:
        return model, None
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[info.local_rank] if device.type == "cuda" else None,
        find_unused_parameters=True)
    return model, ddp


def _average_in_place(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` over all ranks, in place: one flattened all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    world = dist.get_world_size()
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over all ranks, in place.

    Without SyncBatchNorm each rank's running statistics follow its own batches; the EMA teacher
    copies them, and it must stay identical on every rank (it makes the pseudo-labels and the class
    statistics every rank shares)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    _average_in_place([b for b in module.buffers() if b.dtype.is_floating_point])


@torch.no_grad()
def average_grads(params: list[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over all ranks, in place (parameters DDP does not own:
    a method's loss-only heads). Parameters without a gradient are skipped; every rank computes
    the same losses, so the same ones have none."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    _average_in_place([p.grad for p in params if p.grad is not None])


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """``flag`` and-ed over all ranks (one MIN all-reduce): decisions that change which
    collectives run (skipping a backward on a non-finite loss) must be the same on every rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` alone."""
    if not is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
