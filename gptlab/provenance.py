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

from gptlab.io import restore_non_finite, write_json_atomic

_PACKAGES = ("gptlab", "torch", "tokenizers", "safetensors", "datasets", "transformers", "gguf")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_state(package_dir: str | Path | None) -> tuple[str, bool] | None:
    """(commit, dirty) of the git checkout gptlab runs from: dirty when gptlab's files differ
    from the commit (edited, added or removed). None when not in a git checkout, or when
    `package_dir` (gptlab's own folder) is not tracked by the repository around it, as an
    installed copy inside another project's repository (whose commit says nothing of it)."""
    here = Path(package_dir) if package_dir else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            # --no-optional-locks: `status` would otherwise refresh and rewrite the index
            # under index.lock, failing a git command the user runs there meanwhile.
            r = subprocess.run(["git", "--no-optional-locks", *args], cwd=here,
                               capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None

    if not (git("ls-files", "--", ".") or "").strip():  # no file of the package is tracked
        return None
    commit = (git("rev-parse", "HEAD") or "").strip()
    status = git("status", "--porcelain", "--", ".")
    if not commit or status is None:
        return None
    return commit, bool(status.strip())


def command_line() -> list[str]:
    """The command that is running, as it can be typed again: `python -m gptlab` has
    `.../gptlab/__main__.py` as sys.argv[0]."""
    program = os.path.basename(sys.argv[0])
    if program == "__main__.py":
        return [os.path.basename(sys.executable) or "python", "-m",
                Path(sys.argv[0]).resolve().parent.name] + sys.argv[1:]
    return [program] + sys.argv[1:]


def record_run(out_dir: str | Path, config: Any, name: str = "run.json") -> Path:
    """Write `out_dir/run.json` with the resolved config and where it came from."""
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    git = git_state(None)
    info = {
        "config": cfg,
        "command": command_line(),
        "versions": package_versions(),
        "git_commit": git[0] if git else None,
        "git_dirty": git[1] if git else None,  # the commit alone does not say what ran
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = Path(out_dir) / name
    write_json_atomic(path, info, non_finite="null")
    return path


def load_run(out_dir: str | Path, name: str = "run.json") -> dict:
    return restore_non_finite(json.loads((Path(out_dir) / name).read_text()))
