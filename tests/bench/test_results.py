"""Run metadata: the commit recorded for a tree copied without its .git."""

import subprocess

import torch

from fms.bench.results import COMMIT_ENV, git_commit, run_metadata


def test_commit_comes_from_the_environment_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv(COMMIT_ENV, "f0b6929d48828ff3339d869d83161f3b71306f06")
    assert run_metadata("cmd", torch.device("cpu"))["git_commit"] == "f0b6929d48828ff3339d869d83161f3b71306f06"
    monkeypatch.delenv(COMMIT_ENV)
    assert git_commit(cwd=tmp_path) == "unknown"  # no repository above a fresh temporary folder
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_commit(cwd=tmp_path) == head.strip()
