"""The commit a results file names, without importing torch (the load generator of `fms bench serve` uses it too)."""

import os
import subprocess
from pathlib import Path

COMMIT_ENV = "FMS_GIT_COMMIT"  # the commit of a tree copied without its .git (a device run's clean copy)
TREE_COMMIT_FILE = "COMMIT"  # written by final_project/results/build_trees.sh at the root of a clean tree


def _tree_commit(cwd) -> str | None:
    """The commit in a COMMIT file at the root of the tree holding cwd (a folder holding a `fms` package), looked for
    up to the first folder with a .git (a checkout, which git answers for): a clean tree built inside a checkout
    would otherwise report the checkout's HEAD."""
    for folder in [Path(cwd or ".").resolve(), *Path(cwd or ".").resolve().parents]:
        if (folder / ".git").exists():  # a checkout: git answers
            return None
        marker = folder / TREE_COMMIT_FILE
        if marker.is_file() and (folder / "fms").is_dir():
            return marker.read_text().strip() or None
    return None


def git_commit(cwd=None) -> str:
    """The FMS_GIT_COMMIT environment variable when set, else the COMMIT file of a clean tree holding cwd, else
    `git rev-parse HEAD` there, else "unknown"."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    tree = _tree_commit(cwd)
    if tree is not None:
        return tree
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
