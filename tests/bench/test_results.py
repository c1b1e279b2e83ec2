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


def test_a_clean_tree_inside_a_checkout_names_its_own_commit(monkeypatch, tmp_path):
    # build_trees.sh writes COMMIT at the root of a tree copied without its .git, often inside a checkout, where
    # git would answer with the checkout's HEAD
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    bench = tmp_path / ".wB" / "fms" / "bench"
    bench.mkdir(parents=True)
    assert git_commit(cwd=bench) == head.strip()  # no COMMIT file: git's answer
    (tmp_path / ".wB" / "COMMIT").write_text("9bfe15d\n")
    assert git_commit(cwd=bench) == "9bfe15d"
    (tmp_path / "fms").mkdir()
    (tmp_path / "COMMIT").write_text("ffffff\n")  # in the checkout itself: git answers
    assert git_commit(cwd=tmp_path / "fms") == head.strip()
