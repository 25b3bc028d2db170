"""What the step benchmarks share: waiting for a device before reading the clock, naming it,
timing training steps, and alternating the two sides' timed passes.

The scripts run as `python bench/NAME.py`, so this folder is on their import path.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" \
        else str(device)


def training_steps_per_second(model: torch.nn.Module, loss_fn: Callable, batches: list,
                              device: torch.device, **adamw: Any) -> float:
    """One pass over `batches` (forward, `loss_fn(model, batch)`, backward, an AdamW step
    with a fresh optimizer made with `adamw`): its steps per second."""
    opt = torch.optim.AdamW(model.parameters(), **adamw)
    sync(device)
    t = time.perf_counter()
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, b).backward()
        opt.step()
    sync(device)
    return len(batches) / (time.perf_counter() - t)


def alternating_medians(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each side's median rate: one untimed pass each (warm-up), then `repeats` timed passes
    each, the sides alternating so that a machine's drift falls on both."""
    for run in sides.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            rates[name].append(run())
    return {name: statistics.median(r) for name, r in rates.items()}
