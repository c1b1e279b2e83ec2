"""A plain script runs unchanged under `torchrun --nproc-per-node 2`: get_model(distributed_strategy="tp") joins the
group from torchrun's environment, and generate() returns the single-process tokens on every rank (CPU, gloo)."""

import json
import os
import shutil
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from fms.models import get_model
from fms.utils.generation import generate

PROMPTS = [[5, 17, 300, 42, 7], [100, 200, 3, 1500, 9, 11, 64]]
NEW = 8

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from fms.models import get_model
    from fms.utils.generation import generate

    torch.set_num_threads(1)
    model = get_model("llama", "micro", distributed_strategy="tp")
    tokens = generate(model, {prompts}, {new}, attn_name="paged", page_size=16)
    with open(os.path.join(sys.argv[1], f"rank{{os.environ['RANK']}}.json"), "w") as f:
        json.dump(dict(tokens=tokens, kv_heads=model.cache_spec().num_kv_heads), f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_script_runs_unchanged_under_torchrun(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(prompts=PROMPTS, new=NEW))
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               PYTHONHASHSEED="0")
    command = [shutil.which("torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = generate(get_model("llama", "micro"), PROMPTS, NEW, attn_name="sdpa")
    assert len({t for row in reference for t in row}) > 8
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"tokens": reference, "kv_heads": 1}, rank
