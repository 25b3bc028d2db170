"""Moving what the host built (batches, index lists, prompts) to the device without waiting.

On CUDA a copy from ordinary (pageable) host memory, `x.to("cuda")` or `torch.tensor(list,
device="cuda")`, makes the host wait until every kernel queued before it has run; one a token
or one a batch leaves the GPU idle while the host catches up. A copy from pinned memory with
`non_blocking=True` is queued behind that work instead. The training loop and the stages move
their host-built tensors through here; it imports nothing of gptlab, so that the model and
the engine can too.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def queued_copy(t: Tensor, device: torch.device | str) -> Tensor:
    """A host tensor on `device`, the host not waiting: on CUDA the copy goes through pinned
    memory, queued behind the stream's work (a plain copy waits for that work to finish, and
    a non-blocking one is safe only from pinned memory); elsewhere a plain copy. The pinned
    buffer is a fresh copy of `t`, which nothing writes again (torch's pinned allocator hands
    it out again only once the copy has run), so `t` may change at once. A `t` pinned already
    is copied too: its `pin_memory` is `t` itself, which the queued copy would read after the
    host had gone on to change it."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return (t.clone() if t.is_pinned() else t).pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (a tensor, or a dict / list / tuple of them) to `device`,
    each a `queued_copy`; anything else stays as it is (a batch's host lists)."""
    if isinstance(batch, Tensor):
        return queued_copy(batch, device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
