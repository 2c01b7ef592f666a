"""Data parallelism under torchrun: process group, device per rank, batch sharding, reductions.

Launched by `torchrun --nproc_per_node K`, the environment holds WORLD_SIZE > 1 and every rank
runs the same fit(); without it everything here degrades to a single process (no torch.distributed
calls at all), so the one training loop serves both.
"""

import builtins
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rbkd.engine.device import resolve_device
from rbkd.locking import folder_lock

T = TypeVar("T")


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
            # On success every rank reaches this point before any tears the group down: a rank
            # that closed its gloo connections while another was still finishing its last
            # collective made that rank abort at exit ("terminate called without an active
            # exception", once in three full test runs under load). Not while an exception is
            # propagating (close runs in finally blocks): the other ranks may never come, and a
            # failing run must exit, not wait.
            if sys.exc_info()[0] is None:
                dist.barrier()
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


def is_main_process() -> bool:
    """Rank 0 of the process group, or of torchrun's environment when no group is open (yet, or
    any more): the one process that writes files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def on_main(ctx: DistContext, fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 only; every rank returns its value, or raises its error. The other ranks
    wait here for rank 0, so this is also where they cannot race ahead of its writes."""
    if ctx.world_size == 1:
        return fn()
    box: list = [None]
    if ctx.is_main:
        try:
            box[0] = (True, fn())
        except Exception as e:
            box[0] = (False, _portable(e))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _portable(error: Exception) -> Exception:
    """The error as every rank can rebuild it: a built-in exception type keeps its type (the CLI
    maps ValueError and friends to its exit codes), anything else becomes a RuntimeError with
    the same message. Only plain types cross the process boundary, never the error object."""
    kind = type(error)
    builtin = getattr(builtins, kind.__name__, None)
    for base in kind.__mro__:
        if getattr(builtins, base.__name__, None) is base and issubclass(base, Exception):
            builtin = base
            break
    try:
        return builtin(str(error)) if builtin is not None else RuntimeError(str(error))
    except Exception:
        return RuntimeError(str(error))


@contextlib.contextmanager
def main_folder_lock(
    folder: str | os.PathLike[str],
    what: str,
    device: str,
    claim: Callable[[Path], object] | None = None,
) -> Iterator[DistContext]:
    """Hold `folder`'s lock for the block on rank 0 only (the folder is created), with the process
    group open for the whole block; yields the context. The other ranks wait until rank 0 holds
    the lock, or raise its error (another process holds it): under torchrun every rank runs the
    same command, and only rank 0 writes. `claim(folder)` runs first (rank 0): it refuses a
    folder rbkd may not write into (rbkd.engine.rundir.check_run_folder)."""
    ctx = setup(device)

    def lock(stack: contextlib.ExitStack) -> None:
        if claim is not None:
            claim(Path(folder))
        stack.enter_context(folder_lock(Path(folder), what))

    try:
        with contextlib.ExitStack() as stack:
            on_main(ctx, lambda: lock(stack))
            yield ctx
    finally:
        ctx.close()


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
