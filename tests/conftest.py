"""Shared test setup: one torch thread per test, and nothing written outside pytest's temp dirs.

The suite runs as two pytest workers on two cores; letting each use two threads oversubscribes
the cores and makes every test several times slower. A test that changes the thread count
(`gptlab pipeline --threads 2` does, for the rest of its process) gets one back afterwards.

The caches gptlab and its libraries keep under $HOME, the system temp directory or the working
directory (gptlab's token cache, the built-in world's database, matplotlib's font list, Hugging
Face's caches, hypothesis's .hypothesis/) go to throwaway directories, whatever the user's shell
sets, and a subprocess's with them. Variables of the user's shell that would change what a test
sees (`GPTLAB_WORLD`, a torchrun's `WORLD_SIZE`) are cleared. Hugging Face's libraries run
offline: a test that reached for the Hub would fail at once, not wait on the network."""
import os
import shutil
import tempfile
from pathlib import Path

import hypothesis.configuration
import pytest

# OpenMP reads this once, as torch loads it: threads waiting on each other sleep instead of
# spinning. A test on two threads (`--threads 2`) beside the other worker has one core for both;
# spinning, the pipeline's evaluation took 167 s there instead of 17.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
import torch  # noqa: E402

torch.set_num_threads(1)

_CACHES = {"GPTLAB_CACHE": "gptlab", "MPLCONFIGDIR": "matplotlib", "HF_HOME": "huggingface",
           "HF_DATASETS_CACHE": "huggingface/datasets", "XDG_CACHE_HOME": "xdg",
           "TORCHINDUCTOR_CACHE_DIR": "torchinductor"}
_CLEARED = ("GPTLAB_WORLD", "WORLD_SIZE", "RANK", "LOCAL_RANK")
_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_root: Path | None = None


def pytest_configure(config):
    """Before the test modules are imported: matplotlib reads MPLCONFIGDIR on import."""
    global _root
    _root = Path(tempfile.mkdtemp(prefix="gptlab-test-caches-"))
    for name, sub in _CACHES.items():
        os.environ[name] = str(_root / sub)
    for name in _CLEARED:
        os.environ.pop(name, None)
    for name in _OFFLINE:
        os.environ[name] = "1"
    hypothesis.configuration.set_hypothesis_home_dir(_root / "hypothesis")


def pytest_unconfigure(config):
    if _root is not None:
        shutil.rmtree(_root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _temp_dir_under_pytests(tmp_path_factory):
    """The system temp directory (the built-in world's database cache, `datasets`' throwaway
    dirs) is one under pytest's own, which pytest prunes."""
    tmp = tmp_path_factory.mktemp("system-tmp", numbered=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(tmp))
        mp.setenv("TMPDIR", str(tmp))
        yield tmp


@pytest.fixture(autouse=True)
def _one_thread():
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
