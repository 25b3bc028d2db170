"""Shared test setup: one torch thread per test process.

The suite runs as two pytest workers on two cores; letting each use two threads oversubscribes
the cores and makes every test several times slower."""
import os
import tempfile

import torch

torch.set_num_threads(1)
# Token caches of the tests go to a throwaway directory, not the user's ~/.cache.
os.environ.setdefault("GPTLAB_CACHE", tempfile.mkdtemp(prefix="gptlab-test-cache-"))
