"""Batches of a split, and the validation pass: loss and top-1, summed over ranks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from archopt.errors import DataError
from archopt.train.data import ImageData, TensorImages, normalize
from archopt.train.runtime import allreduce_sum


def iter_batches(
    dataset, batches: list[torch.Tensor], num_workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of each batch of indices: in-memory data directly, folders through a
    DataLoader with ``num_workers``."""
    if isinstance(dataset, TensorImages):
        for idx in batches:
            yield dataset.get_batch(idx)
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[b.tolist() for b in batches],
        num_workers=num_workers,
        persistent_workers=False,
    )
    try:
        yield from loader
    except DataError as e:
        # A worker's error comes back with its traceback in the message; keep our one line.
        text = str(e).strip()
        if "\n" not in text:
            raise
        last = text.splitlines()[-1]
        raise DataError(last.split(": ", 1)[1] if ": " in last else last) from None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ImageData,
    *,
    batch_size: int = 256,
    bf16: bool = False,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) on the validation split, summed over ranks."""
    device = torch.device(device)
    model.eval()
    n = len(data.val)
    shard = torch.arange(rank, n, world_size)  # uneven shards are fine: no collective inside
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    loss_sum = correct = count = 0.0
    for images, labels in iter_batches(data.val, batches, num_workers):
        x = normalize(images.to(device), data.mean, data.std)
        labels = labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += float((logits.argmax(1) == labels).sum())
        count += labels.numel()
    loss_sum, correct, count = allreduce_sum([loss_sum, correct, count], device, world_size)
    return loss_sum / max(count, 1), correct / max(count, 1)
