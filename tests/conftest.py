"""Shared test setup: one torch thread per test process.

The suite runs as two pytest workers on two cores; letting each use two threads oversubscribes
the cores and makes every test several times slower."""
import torch

torch.set_num_threads(1)
