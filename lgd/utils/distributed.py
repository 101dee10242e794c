"""Data-parallel training with torch.distributed, launched by torchrun.

    torchrun --nproc_per_node=2 -m lgd train -c configs/synthetic_retinanet_lgd.yaml

torchrun starts one process per GPU (or per CPU share) and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` reads them. Without them everything here is the identity
of a single process, so the training loop has one code path. The backend is NCCL on CUDA and gloo on CPU.

The global batch (``data.batch_size``) is the same whatever the number of processes: each global batch of
the single-process data stream is cut into ``world_size`` equal shares, rank r taking share r
(:func:`lgd.data.build_train_loader`), and DistributedDataParallel averages the gradients. Losses that are
means over images (RetinaNet's, the teacher's, the distillation loss on equally padded images) therefore
give the single-process gradients; terms normalised over the whole batch (FCOS's foreground count, the
R-CNNs' sampled proposals) are normalised per process instead, as in every data-parallel detector trainer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from lgd.errors import ConfigError, LGDError

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` processes and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when init() created the process group (and cleanup() must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device) -> Context:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a single process otherwise.

    On CUDA each process takes the GPU ``cuda:LOCAL_RANK``. A process group that already exists (library use)
    is used as it is and left for its creator to destroy.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return Context(rank, world, local, _process_device(device, local, world), owns_group=False)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Context(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = _process_device(device, local, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, local, device, owns_group=True)


def _process_device(device: torch.device, local_rank: int, world_size: int) -> torch.device:
    if device.type != "cuda" or world_size == 1:
        return device
    if device.index is not None and device.index != local_rank:
        raise ConfigError(f"device={device} names one GPU, but with torchrun every process uses cuda:LOCAL_RANK; "
                          "use device=cuda or device=auto (restrict GPUs with CUDA_VISIBLE_DEVICES)")
    if local_rank >= torch.cuda.device_count():
        raise LGDError(f"process with LOCAL_RANK={local_rank} has no GPU: this machine has "
                       f"{torch.cuda.device_count()}; start at most that many processes per node")
    return torch.device("cuda", local_rank)


def cleanup(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def share_from_main(ctx: Context, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result, or its LGDError, to every rank.

    For work that must happen once (checking or creating the output folder, reading the checkpoint to resume
    from): every rank then fails with the same message instead of waiting forever for a rank that stopped.
    """
    if not ctx.distributed:
        return fn()
    box: list[Any] = [None]
    if ctx.is_main:
        try:
            box[0] = ("ok", fn())
        except LGDError as e:
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def all_reduce_sum(ctx: Context, values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over all ranks (a new tensor; float32 so that half-precision sums cannot overflow)."""
    values = values.detach().float()
    if ctx.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def mean_over_ranks(ctx: Context, values: dict[str, float]) -> dict[str, float]:
    """Per-key mean of every rank's loss values, for logging (a key missing on some ranks averages the rest)."""
    if not ctx.distributed:
        return dict(values)
    gathered: list[Optional[dict[str, float]]] = [None] * ctx.world_size
    dist.all_gather_object(gathered, values)
    keys = list(dict.fromkeys(k for d in gathered for k in d))  # first-seen order, as logged
    return {k: sum(d[k] for d in gathered if k in d) / sum(k in d for d in gathered) for k in keys}


def gather_lists(ctx: Context, items: list[T]) -> Optional[list[T]]:
    """Every rank's ``items`` concatenated on rank 0 (rank order); ``None`` on the other ranks."""
    if not ctx.distributed:
        return items
    gathered: Optional[list[Optional[list[T]]]] = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(items, gathered, dst=0)
    if gathered is None:
        return None
    return [x for part in gathered for x in part]  # type: ignore[union-attr]


def all_gather_list(ctx: Context, item: T) -> list[T]:
    """One item from every rank, in rank order, on every rank."""
    if not ctx.distributed:
        return [item]
    gathered: list[Optional[T]] = [None] * ctx.world_size
    dist.all_gather_object(gathered, item)
    return gathered  # type: ignore[return-value]


def broadcast(ctx: Context, item: T) -> T:
    """Rank 0's ``item`` on every rank."""
    if not ctx.distributed:
        return item
    box = [item]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def per_rank_batch(batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """Images each rank takes from a global batch; the global batch must split evenly."""
    if batch_size % (world_size * accumulate):
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch of all processes together and must split evenly "
            f"into {world_size} processes x solver.accumulate={accumulate} micro-batches; use a multiple of "
            f"{world_size * accumulate}"
        )
    return batch_size // world_size


def shard_indices(ctx: Context, n: int) -> Sequence[int]:
    """The indices of an n-item evaluation set this rank handles: rank, rank + world_size, ..."""
    return range(ctx.rank, n, ctx.world_size)
