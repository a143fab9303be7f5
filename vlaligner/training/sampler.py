"""The training data order: a pure function of (seed, epoch), sharded across processes.

A resumed run starts mid-epoch at exactly the sample it stopped at.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

__all__ = ["ShardedSampler", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    # Mix so that (seed, epoch) pairs do not collide the way seed + epoch would.
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63)


class ShardedSampler(torch.utils.data.Sampler[int]):
    """Indices of one process's share of a data set, as a pure function of (seed, epoch).

    Training (``global_batch_size`` given): the permutation of the epoch is cut to a multiple
    of the global batch (every process then takes the same number of steps), and process
    ``rank`` takes positions ``rank, rank + W, ...``. Consecutive chunks of ``G / W`` indices
    of every process then make up exactly the global batch ``perm[s*G:(s+1)*G]`` of step
    ``s``, whatever the number of processes or accumulation steps.

    Evaluation (``global_batch_size=None``, ``shuffle=False``): every sample exactly once over
    all processes (no padding duplicates, unlike ``DistributedSampler``), so summed metrics
    are exact.

    ``set_epoch(epoch, skip=k)`` drops this process's first ``k`` indices: how a resumed run
    continues in the middle of an epoch without loading the skipped samples.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        global_batch_size: Optional[int] = None,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        if global_batch_size is not None:
            if global_batch_size < 1 or global_batch_size % num_replicas:
                raise ValueError(
                    f"global_batch_size must be a positive multiple of num_replicas={num_replicas}, "
                    f"got {global_batch_size}"
                )
        self.num_samples = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.global_batch_size = global_batch_size
        self.epoch = 0
        self.skip = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (training mode only)."""
        if self.global_batch_size is None:
            raise ValueError("steps_per_epoch needs global_batch_size")
        return self.num_samples // self.global_batch_size

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch (its permutation) and how many of this process's indices to skip."""
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self.epoch = int(epoch)
        self.skip = int(skip)

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.global_batch_size is not None:
            order = order[: self.steps_per_epoch * self.global_batch_size]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices()[self.skip :])

    def __len__(self) -> int:
        if self.global_batch_size is not None:
            total = self.steps_per_epoch * self.global_batch_size // self.num_replicas
        else:
            total = len(range(self.rank, self.num_samples, self.num_replicas))
        return max(0, total - self.skip)
