"""Counting the calls that make the host wait for a GPU, on the CPU.

On CUDA, reading a tensor's value on the host (`.item()`, `.tolist()`, `bool()`, `int()`,
`float()`, a tensor used as a Python index), or an op whose output size depends on the values
(`nonzero`, `masked_select`, indexing with a boolean mask, `repeat_interleave` without its
output size, `unique`), or `torch.equal`, waits until every kernel queued before it has run.
So does a copy between the host and the GPU that is not `non_blocking` (`x.to(device)`,
`torch.tensor(list, device=device)`): it synchronizes the stream after queueing the copy.
A training step that does so once a layer or once a token spends its time waiting on the
launches, not on the arithmetic. The CPU runs the same ops, so `count_waits` counts them here,
where there is no GPU: every such call inside the block, on any tensor. Here every tensor is on
the CPU, so the functions that a GPU run too runs on the CPU (building a batch before it
moves) are named as `cpu_side`, and what they call is not counted.

Copies are counted when asked for (`copies=True`), where gptlab's code asks for one: a `.to`
that names a device (or a tensor) without `non_blocking=True`, and `torch.tensor` /
`torch.as_tensor` given a device. Here that device is the CPU and nothing is copied, so the
counter cannot tell a copy from a move to where a tensor is already (the engine's draws move
to their generator's device, a no-op but on Apple's MPS): a block that counts them should make
no such move."""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ROOT = Path(__file__).resolve().parent.parent
aten = torch.ops.aten

# Ops that read values to the host, or size their output by them.
_ALWAYS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.equal.default, aten._unique2.default, aten.unique_dim.default,
           aten.unique_consecutive.default}


def _waits(func, args, kwargs) -> bool:
    if func in _ALWAYS:
        return True
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default):
        # a boolean mask among the indices: its true positions are counted on the device
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return False


class WaitCount:
    """What `count_waits` saw: `total`, and `sites`, a Counter of 'op file:line' (the innermost
    frame in gptlab/ or tests/)."""

    def __init__(self, cpu_side: Iterable[Callable] = ()) -> None:
        self.sites: Counter[str] = Counter()
        self.cpu_side = {f.__code__ for f in cpu_side}

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def add(self, op: str) -> None:
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code in self.cpu_side:
                return
            frame = frame.f_back
        self.sites[f"{op} {_caller()}"] += 1

    def __repr__(self) -> str:
        return f"WaitCount({self.total}: {dict(self.sites)})"


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if (path.is_relative_to(_ROOT / "gptlab") or path.is_relative_to(_ROOT / "tests")) \
                and path.name != "device_waits.py":
            return f"{path.relative_to(_ROOT)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class _Mode(TorchDispatchMode):
    def __init__(self, count: WaitCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _waits(func, args, kwargs):
            self.count.add(func.__name__.split(".")[0])
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_waits(cpu_side: Iterable[Callable] = (), copies: bool = False
                ) -> Iterator[WaitCount]:
    """Count, inside the block, the calls that would wait for a GPU (see the module's doc),
    but for those made inside the functions `cpu_side`; `copies`: blocking copies too.
    `.tolist()` reaches no op on the CPU, so it is counted where Python calls it, as copies
    are."""
    count = WaitCount(cpu_side)
    tolist, to, tensor, as_tensor = torch.Tensor.tolist, torch.Tensor.to, torch.tensor, \
        torch.as_tensor

    def counted_tolist(self):
        count.add("tolist")
        return tolist(self)

    def counted_to(self, *args, **kwargs):
        if copies and _names_device(args, kwargs) and not _non_blocking(args, kwargs) \
                and _ours():
            count.add("copy")
        return to(self, *args, **kwargs)

    def counted(make):
        def made(*args, **kwargs):
            if copies and kwargs.get("device") is not None and _ours():
                count.add("copy")
            return make(*args, **kwargs)
        return made

    torch.Tensor.tolist, torch.Tensor.to = counted_tolist, counted_to
    torch.tensor, torch.as_tensor = counted(tensor), counted(as_tensor)
    try:
        with _Mode(count):
            yield count
    finally:
        torch.Tensor.tolist, torch.Tensor.to = tolist, to
        torch.tensor, torch.as_tensor = tensor, as_tensor


def _ours() -> bool:
    """Whether the copy was asked for by gptlab's code or a test's, not by torch's: its
    `clip_grad_norm_` and `Module.to` move each tensor to the device it is on, which copies
    nothing on a GPU either."""
    path = Path(sys._getframe(2).f_code.co_filename)
    return path.is_relative_to(_ROOT / "gptlab") or path.is_relative_to(_ROOT / "tests")


def _names_device(args: tuple, kwargs: dict) -> bool:
    """Whether `Tensor.to(*args, **kwargs)` names a device: a device, its name or a tensor (not
    a dtype alone)."""
    return kwargs.get("device") is not None or kwargs.get("other") is not None or bool(
        args and isinstance(args[0], (str, torch.device, torch.Tensor, int))
        and not isinstance(args[0], bool))


def _non_blocking(args: tuple, kwargs: dict) -> bool:
    return bool(kwargs.get("non_blocking")) or any(a is True for a in args)
