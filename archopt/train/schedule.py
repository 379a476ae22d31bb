"""What happens at which step: the learning-rate schedule, data order, derived seeds.

All pure functions of (seed, epoch, step, rank), which is what makes a resumed run take the
same steps as an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Random streams derived from the seed; each (seed, epoch, stream, rank) gets its own.
ORDER, AUGMENT, TORCH = 0, 1, 2


def derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for the stream named by ``keys`` (no overlap, no hashing)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)[0] >> 1)


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from base_lr / warmup_steps to base_lr, then cosine decay towards 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def epoch_batches(
    n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """This rank's index batches for one epoch: a function of (seed, epoch, rank) only.

    A permutation shared by all ranks, padded by wrap-around to a multiple of the world size
    and sharded by stride (what DistributedSampler does), then cut into ``batch_size`` //
    ``world_size`` batches; the incomplete last batch is dropped (a batch of one breaks batch
    norm), unless it is the only one.
    """
    if batch_size % world_size:
        raise ValueError(
            f"batch_size (the global batch) must be divisible by the number of processes "
            f"({world_size}), got {batch_size}"
        )
    local_bs = batch_size // world_size
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, ORDER))
    perm = torch.randperm(n, generator=g)
    total = math.ceil(n / world_size) * world_size
    perm = torch.cat([perm, perm[: total - n]])
    local = perm[rank::world_size]
    steps = max(1, len(local) // local_bs)
    return [local[i * local_bs : (i + 1) * local_bs] for i in range(steps)]
