"""Every run directory records what made it: config, versions, git commit, command line."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from gptlab.io import write_json_atomic

_PACKAGES = ("gptlab", "torch", "tokenizers", "safetensors", "datasets", "transformers", "gguf")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                           timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def record_run(out_dir: str | Path, config: Any, name: str = "run.json") -> Path:
    """Write `out_dir/run.json` with the resolved config and where it came from."""
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    info = {
        "config": cfg,
        "command": [os.path.basename(sys.argv[0])] + sys.argv[1:],
        "versions": package_versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = Path(out_dir) / name
    write_json_atomic(path, info)
    return path


def load_run(out_dir: str | Path, name: str = "run.json") -> dict:
    return json.loads((Path(out_dir) / name).read_text())
