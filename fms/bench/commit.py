"""The commit a results file names, without importing torch (the load generator of `fms bench serve` uses it too)."""

import os
import subprocess

COMMIT_ENV = "FMS_GIT_COMMIT"  # the commit of a tree copied without its .git (a device run's clean copy)


def git_commit(cwd=None) -> str:
    """The FMS_GIT_COMMIT environment variable when set, else `git rev-parse HEAD` here, else "unknown"."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
