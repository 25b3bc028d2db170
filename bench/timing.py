"""What the step benchmarks share: waiting for a device before reading the clock, and naming it.

The scripts run as `python bench/NAME.py`, so this folder is on their import path.
"""
from __future__ import annotations

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" \
        else str(device)
