"""Batching: `collate`, and a data loader whose epochs replay exactly (for resume and DDP).

    loader = build_dataloader(dataset, batch_size=2, train=True, num_workers=2, seed=0)
    for epoch in range(start_epoch, epochs):
        set_epoch(loader, epoch, start_batch=k if epoch == start_epoch else 0)
        for batch in loader: ...

Shuffling comes from (seed, epoch); each sample's augmentation RNG is seeded from
(seed, epoch, position in the epoch), so batch k of an epoch is the same whether the epoch
started at 0 or was resumed at k, and whatever the number of workers.
Under torch.distributed each rank takes every world_size-th index of the same permutation;
`batch_size` is per rank.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from proscale.data.build import build_dataset  # noqa: F401  (part of the data-loading API)

_MASK64 = (1 << 64) - 1


def collate(batch: list[dict]) -> dict:
    """List of samples -> {"images": [uint8 (3, H_i, W_i)], "targets": [{"labels", "masks"}],
    and every other per-sample key as a list}. Images keep their own sizes; the model pads."""
    out = {"images": [s["image"] for s in batch],
           "targets": [{"labels": s["labels"], "masks": s["masks"]} for s in batch]}
    for key in batch[0] if batch else ():
        if key != "image":
            out[key] = [s[key] for s in batch]
    return out


def mix_seed(*values: int) -> int:
    """A seed in [0, 2^63) from any number of integers, e.g. (seed, epoch, position).

    Each value is folded in with one splitmix64 step (xor, add the golden-ratio constant, then
    the finaliser's multiply-xorshift mix), so nearby inputs such as consecutive positions give
    unrelated seeds. Values are taken modulo 2^64 (negative ones wrap); the result is shifted to
    63 bits so it fits a signed int64. Deterministic across processes and platforms (unlike
    hash() of a str).
    """
    x = 0
    for v in values:
        x = (x ^ (v & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x >> 1


class ResumableBatchSampler(Sampler[list]):
    """Yields batches of (dataset index, sample seed) for one rank.

    Training: a permutation from (seed, epoch), padded by wrapping so every rank gets the same
    number of samples, incomplete last batch dropped. Evaluation: dataset order, no padding
    (a sample is never seen twice), last batch kept.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.seed, self.drop_last = seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch's order and skips its first `start_batch` batches (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _rank_positions(self) -> list[int]:
        if self.shuffle:
            per_rank = math.ceil(self.size / self.num_replicas)
            total = per_rank * self.num_replicas
        else:
            total = self.size
        return list(range(self.rank, total, self.num_replicas))

    def _num_batches(self) -> int:
        n = len(self._rank_positions())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        """Batches left in this epoch after `start_batch`."""
        return max(0, self._num_batches() - self.start_batch)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        positions = self._rank_positions()
        for b in range(self.start_batch, self._num_batches()):
            chunk = positions[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(order[p % self.size], mix_seed(self.seed, self.epoch, p)) for p in chunk]


class SeededDataset(Dataset):
    """Wraps a data set so item (index, seed) is loaded with torch's RNG seeded by `seed`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.metadata = getattr(dataset, "metadata", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG untouched
            torch.manual_seed(seed)
            return self.dataset[index]


def build_dataloader(dataset: Dataset, batch_size: int, train: bool, num_workers: int = 0,
                     seed: int = 0, distributed: bool | None = None) -> DataLoader:
    """DataLoader yielding `collate` batches; see the module docstring for epochs and resume.

    distributed: None = shard across ranks when torch.distributed is initialised.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised
    if distributed and not initialised:
        raise RuntimeError("distributed=True but torch.distributed is not initialised")
    replicas, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    sampler = ResumableBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed,
                                    drop_last=train, num_replicas=replicas, rank=rank)
    if train and len(sampler) == 0:
        raise ValueError(f"a training data set of {len(dataset)} samples gives no full batch of "
                         f"{batch_size} per rank across {replicas} rank(s)")
    return DataLoader(SeededDataset(dataset), batch_sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, persistent_workers=num_workers > 0)


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Sets the epoch of a `build_dataloader` loader and how many of its batches to skip."""
    loader.batch_sampler.set_epoch(epoch, start_batch)
