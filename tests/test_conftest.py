"""The suite's own setup (conftest.py): every test starts on one torch thread, and nothing a
test makes lands in $HOME or the system temp directory outside pytest's."""
import os
import tempfile
from pathlib import Path

import torch

from gptlab.data.tokens import default_cache_dir
from gptlab.world import build_world


def test_a_test_that_takes_more_threads_keeps_them_to_itself():
    torch.set_num_threads(2)  # as `gptlab pipeline --threads 2` does, for the whole process


def test_the_next_test_starts_on_one_thread_again():
    assert torch.get_num_threads() == 1


def test_the_caches_and_the_temp_dir_are_throwaway(tmp_path_factory):
    import datasets
    import matplotlib

    base = tmp_path_factory.getbasetemp()
    assert Path(tempfile.gettempdir()).is_relative_to(base)
    assert os.environ["TMPDIR"] == tempfile.gettempdir()  # a subprocess's too
    small = dict(n_train=20, n_validation=5, n_test=5, n_dialogs=2, corpus_chars=2000)
    assert build_world(0, **small).db_path.is_relative_to(base)  # the built-in world's cache
    # The caches under $HOME by default are all in the one throwaway directory.
    root = Path(os.environ["GPTLAB_CACHE"]).parent
    assert root.name.startswith("gptlab-test-caches-")
    for cache in (default_cache_dir(), Path(matplotlib.get_cachedir()),
                  Path(datasets.config.HF_DATASETS_CACHE), Path(os.environ["HF_HOME"])):
        assert cache.is_relative_to(root), cache
    assert "GPTLAB_WORLD" not in os.environ and "WORLD_SIZE" not in os.environ


def test_hugging_face_runs_offline():
    import huggingface_hub

    assert huggingface_hub.constants.HF_HUB_OFFLINE
