"""Batches of variable-length examples for the common loop: right-padded, resumable."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from gptlab.checkpoint import read_meta
from gptlab.data.instruct import Example
from gptlab.data.tokens import EpochSampler


def pad_examples(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. labels[t] is the token at t + 1 where the loss is
    taken on it, else -100; attention_mask marks real tokens."""
    T = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        row = torch.tensor(e.ids, dtype=torch.long)
        ids[i, :n], mask[i, :n] = row, 1
        target_on = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
        labels[i, :n - 1] = torch.where(target_on, row[1:], torch.full_like(row[1:], -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ListBatches:
    """An endless, resumable stream of collated batches over a list of items, reshuffled each
    epoch from the seed (the common loop's `Batches`)."""

    def __init__(self, items: Sequence[Any], batch_size: int, seed: int,
                 collate: Callable[[list[Any]], Any]):
        self.items, self.collate = items, collate
        self.sampler = EpochSampler(len(items), batch_size, seed)

    def __iter__(self) -> "ListBatches":
        return self

    def __next__(self) -> Any:
        return self.collate([self.items[i] for i in self.sampler.next_indices()])

    def state(self) -> dict:
        return self.sampler.state()

    def load_state(self, state: dict) -> None:
        self.sampler.load_state(state)


def fixed_list_batches(items: Sequence[Any], batch_size: int,
                       collate: Callable[[list[Any]], Any]) -> list[Any]:
    """Every item once, in order: a validation set that is the same at each evaluation."""
    return [collate(list(items[i:i + batch_size])) for i in range(0, len(items), batch_size)]


def data_key(rows: Iterable[Any]) -> str:
    """A digest of what a run trains on, in order (JSON-able rows of token ids): a checkpoint's
    data position indexes those rows, so a resume compares the key with the checkpoint's.
    Row by row, so that a large set is never one string in memory."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def warn_if_data_changed(checkpoint: Path, key: str, what: str) -> None:
    """On resume: say so when the data is not the checkpoint's (pretraining does for its
    corpus); a checkpoint from before keys were recorded says nothing."""
    saved = read_meta(checkpoint).get("data_key")
    if saved is not None and saved != key:
        print(f"warning: the {what} changed since the checkpoint; the data position now "
              f"points into other {what}", file=sys.stderr)
