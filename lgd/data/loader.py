"""Data loaders: an infinite, resumable training stream and a one-pass evaluation loader."""

from __future__ import annotations

from itertools import islice
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lgd.errors import DatasetError
from lgd.utils.distributed import per_rank_batch


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Turn B samples into (B images as plain (3, H_i, W_i) tensors, B target dicts)."""
    images = [image.as_subclass(torch.Tensor) for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless stream of batches of ``(index, sample_seed)``, a pure function of ``seed``.

    Epoch ``e`` visits every image once in an order drawn from ``(seed, e)``, each visit
    with its own sample seed so augmentation differs between epochs yet is reproducible.
    With ``aspect_ratio_grouping``, landscape (w/h >= 1) and portrait images fill separate
    batches (a batch never mixes them); an unfinished batch carries over into the next
    epoch, as the stream is endless. ``start_iter`` skips that many batches by computing
    indices only, so resuming at iteration N gives batch N, N+1, ... of an uninterrupted
    run.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        batch_size: int,
        seed: int,
        aspect_ratio_grouping: bool = True,
        start_iter: int = 0,
    ) -> None:
        if len(aspect_ratios) == 0:
            raise DatasetError("the training set has no images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        ratios = np.asarray(aspect_ratios, dtype=np.float64)
        self.groups = (ratios < 1.0).astype(np.int64) if aspect_ratio_grouping else np.zeros(len(ratios), np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.start_iter = start_iter

    def _global_batches(self) -> Iterator[list[tuple[int, int]]]:
        buckets: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.groups))
            sample_seeds = rng.integers(0, 2**31 - 1, size=len(order))
            for idx, sample_seed, group in zip(order.tolist(), sample_seeds.tolist(), self.groups[order].tolist()):
                bucket = buckets[group]
                bucket.append((idx, sample_seed))
                if len(bucket) == self.batch_size:
                    yield bucket
                    buckets[group] = []
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return islice(self._global_batches(), self.start_iter, None)


class ShardedBatchSampler(Sampler[list[Any]]):
    """Rank ``rank``'s share of every global batch of ``batches``: its items ``rank*b .. rank*b + b - 1``,
    with ``b = batch_size / world_size``.

    With the single-process stream as ``batches`` the processes together see exactly the batches one process
    would, so a run's data order does not depend on how many processes train it.
    """

    def __init__(self, batches: Sampler[list[Any]], batch_size: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.batches = batches
        self.share = per_rank_batch(batch_size, world_size)
        self.rank = rank

    def __iter__(self) -> Iterator[list[Any]]:
        start = self.rank * self.share
        for batch in self.batches:
            yield batch[start:start + self.share]


def _aspect_ratios(dataset: Dataset) -> list[float]:
    ratio = getattr(dataset, "aspect_ratio", None)
    n = len(dataset)  # type: ignore[arg-type]
    return [ratio(i) for i in range(n)] if ratio is not None else [1.0] * n


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    workers: int,
    aspect_ratio_grouping: bool = True,
    start_iter: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: Optional[bool] = None,
    worker_init_fn: Optional[Callable[[int], None]] = None,
) -> DataLoader:
    """Endless training loader of rank ``rank``'s share of each global batch, from global batch ``start_iter`` on.

    The global batches of ``batch_size`` images are those of one process (:class:`TrainBatchSampler`), each
    cut into ``world_size`` equal shares (:class:`ShardedBatchSampler`), so the data order, augmentation
    included, is the same whatever the number of processes and data workers. ``dataset`` is indexed with
    ``(idx, sample_seed)``; one without ``aspect_ratio(idx)`` counts as all landscape. ``pin_memory``
    defaults to whether CUDA is available; ``worker_init_fn`` runs in each data-loading worker.
    """
    batches = TrainBatchSampler(_aspect_ratios(dataset), batch_size, seed, aspect_ratio_grouping, start_iter)
    return DataLoader(
        dataset,
        batch_sampler=ShardedBatchSampler(batches, batch_size, rank, world_size),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=worker_init_fn,
    )


def build_eval_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """Loader that visits every image of ``dataset`` once, in index order."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
    )


def stop_workers(batches: Iterator) -> None:
    """Stop the worker processes of a DataLoader iterator now, not whenever it is garbage-collected.

    Training workers ignore SIGTERM (see lgd.engine.signals), which is how multiprocessing stops workers still alive
    at interpreter exit; one left behind then keeps the finished process waiting for it forever. A loader
    without workers has nothing to stop."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
