"""Data parallelism under torchrun: process group, device per rank, batch sharding, reductions.

Launched by `torchrun --nproc_per_node K`, the environment holds WORLD_SIZE > 1 and every rank
runs the same fit(); without it everything here degrades to a single process (no torch.distributed
calls at all), so the one training loop serves both.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rbkd.engine.config import resolve_device


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, global_batch: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
        if self.world_size == 1:
            return global_batch
        return global_batch.tensor_split(self.world_size)[self.rank]

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(device_name: str) -> DistContext:
    """Join the torchrun process group when there is one (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per rank
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), device, owns)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around `model` for K > 1 ranks (it broadcasts rank 0's weights)."""
    if ctx.world_size == 1:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_batchnorm(model: nn.Module, ctx: DistContext) -> bool:
    """On CUDA with K > 1 ranks, BatchNorm must see the GLOBAL batch (the batch size is the
    variable under study), so swap in SyncBatchNorm; gloo/CPU has no SyncBatchNorm and keeps
    per-rank statistics. Returns whether anything was converted."""
    if ctx.world_size == 1 or ctx.device.type != "cuda":
        return False
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    for name, child in model.named_children():
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return True


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Back to BatchNorm2d (same parameters and buffers) so the model runs without a group."""
    out = module
    if isinstance(module, nn.SyncBatchNorm):
        out = nn.BatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        ).to(module.weight.device)
        out.load_state_dict(module.state_dict())
    for name, child in module.named_children():
        setattr(out, name, revert_sync_batchnorm(child))
    return out
