"""The `fms` command: --help of every subcommand, `fms generate` (random weights and a local HF folder),
`fms bench throughput` / `latency` on the CPU, clear refusals (a tensor-parallel size below 1, an unreachable hub id),
and `fms serve` in its own process: SIGTERM lets the request in flight finish, then the process exits 0 and its
engine process is gone."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fms.entrypoints.cli import main
from fms.utils.tokenizers import DEFAULT_TOKENIZER_PATH, get_tokenizer

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["serve", "--help"], ["generate", "--help"], ["bench", "--help"], ["bench", "serve", "--help"],
    ["bench", "throughput", "--help"], ["bench", "latency", "--help"], ["bench", "static", "--help"],
    ["bench", "startup", "--help"], ["eval", "--help"], ["eval", "lm-eval", "--help"],
])
def test_help(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own --help
        rc = e.code
    out = capsys.readouterr().out
    assert rc == (2 if argv == [] else 0) and "usage: fms" in out
    if argv == ["bench", "--help"]:
        assert "startup" in out
    if argv[:1] == ["serve"]:
        for flag in ("--max-num-seqs", "--max-model-len", "--gpu-memory-utilization", "--page-size",
                     "--enable-prefix-caching", "--no-enable-prefix-caching", "--tensor-parallel-size",
                     "--max-waiting", "--chat-template", "--served-model-name", "--engine-process", "--no-engine-process",
                     "--burst-wait-ms"):
            assert flag in out, flag


@pytest.mark.parametrize("value", ["-1", "1001"])
def test_serve_refuses_a_bad_burst_wait_before_loading_anything(value, capsys):
    rc = main(["serve", "--architecture", "llama", "--variant", "micro", "--burst-wait-ms", value])
    assert rc == 2 and f"--burst-wait-ms must be in [0, 1000], got {float(value)}" in capsys.readouterr().err


def test_unknown_command_and_benchmark(capsys):
    assert main(["srve"]) == 2 and "unknown command 'srve'" in capsys.readouterr().err
    assert main(["bench", "nope"]) == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err


def test_bench_gemv_takes_a_model_shape_and_refuses_a_bad_one(capsys):
    """`fms bench gemv` (fms.bench.gemv): --model ARCHITECTURE:VARIANT gives that model's projection shapes; a bad
    spec is a usage error naming it; without a GPU it stops saying so."""
    from fms.bench.gemv import model_shapes

    assert model_shapes("llama:3.1-8b") == {"hidden": 4096, "intermediate": 14336, "qkv": 6144, "vocab": 128256}
    assert model_shapes("llama:3.2-1b") == {"hidden": 2048, "intermediate": 8192, "qkv": 3072, "vocab": 128256}
    for spec, message in (("llama", "--model must be ARCHITECTURE:VARIANT"), ("llama:9b", "unknown variant '9b'")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "gemv", "--model", spec])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device here"):
            main(["bench", "gemv", "--rows", "2"])


def test_generate_with_random_weights(capsys):
    from fms.models import get_model
    from fms.serving import LLMEngine, SamplingParams

    rc = main(["generate", "--architecture", "llama", "--variant", "micro", "--prompt", "Pages of the cache",
               "--prompt", "Hello", "--max-tokens", "5", "--ignore-eos", "--json", "--logprobs", "2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [r["prompt"] for r in lines] == ["Pages of the cache", "Hello"]
    engine = LLMEngine(get_model("llama", "micro", seed=0), get_tokenizer())
    ref = engine.generate(["Pages of the cache", "Hello"], SamplingParams(max_tokens=5, ignore_eos=True),
                          use_tqdm=False)
    assert [r["token_ids"] for r in lines] == [o.token_ids for o in ref]
    assert [r["text"] for r in lines] == [o.text for o in ref]
    assert all(len(r["logprobs"]) == 5 and len(r["logprobs"][0]["top"]) == 2 for r in lines)


def test_generate_from_a_local_hf_folder_with_chat(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(DEFAULT_TOKENIZER_PATH) / name, tmp_path / name)
    rc = main(["generate", str(tmp_path), "--prompt", "Hi", "--chat", "--max-tokens", "3", "--ignore-eos", "--json"])
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert rc == 0 and len(record["token_ids"]) == 3


def test_refusals_name_the_problem(tmp_path, capsys, monkeypatch):
    assert main(["generate", "--architecture", "llama", "--variant", "micro", "--tensor-parallel-size", "0"]) == 2
    assert "--tensor-parallel-size must be an int >= 1" in capsys.readouterr().err
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "some-org/some-model"]) == 2
    err = capsys.readouterr().err
    assert "could not get 'some-org/some-model' from the Hugging Face Hub" in err and "fms serve DIR" in err
    assert main(["generate", str(tmp_path / "missing")]) == 2
    assert "is not a folder here, nor a hub id" in capsys.readouterr().err
    assert main(["generate"]) == 2 and "name a model" in capsys.readouterr().err


def test_cuda_graph_sizes_maps_onto_the_engine_config(capsys):
    import argparse

    from fms.entrypoints.engine_args import add_engine_arguments, engine_config
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config(parser.parse_args(["--cuda-graph-sizes", "8,2,4"])).graph_batch_sizes == (2, 4, 8)
    # not given: the engine picks by device and compile setting (EngineConfig.for_device)
    assert engine_config(parser.parse_args([])).graph_batch_sizes is None
    assert engine_config(parser.parse_args(["--unbacked-batch"])).unbacked_batch is True
    assert engine_config(parser.parse_args([])).unbacked_batch is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--cuda-graph-sizes", "two"])
    assert "expected a comma list of batch sizes like 2,4,8, got 'two'" in capsys.readouterr().err
    assert main(["generate", "--architecture", "llama", "--variant", "micro", "--cuda-graph-sizes", "0,2"]) == 2
    assert "graph_batch_sizes must be a non-empty sequence of ints >= 1, got (0, 2)" in capsys.readouterr().err


def test_bench_throughput_and_latency_on_cpu(tmp_path, capsys):
    rc = main(["bench", "throughput", "--results-dir", str(tmp_path), "--variant", "nano", "--num-requests", "2",
               "--prompt-range", "4,8", "--output-range", "2", "--device", "cpu"])
    assert rc == 0
    written = json.loads((tmp_path / "serving.json").read_text())
    assert written["results"][0]["num_output_tokens"] == 4 and "fms bench throughput" in json.dumps(written)
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--architecture", "llama", "--variant", "nano", "--batch-size", "2",
                 "--input-len", "4", "--output-len", "3", "--num-iters", "2", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["latencies_s"]) == 2 and report["avg_latency_s"] > 0 and report["batch_size"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_sigterm_finishes_in_flight_requests_and_exits_0():
    httpx = pytest.importorskip("httpx")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "fms.entrypoints.cli", "serve", "--architecture", "llama",
                             "--variant", "micro", "--port", str(port), "--log-level", "warning",
                             "--max-decode-steps", "2"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        result = {}

        def in_flight():
            body = {"prompt": "A long answer", "max_tokens": 48, "ignore_eos": True}
            result["response"] = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT_S)

        thread = threading.Thread(target=in_flight)
        thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while "fms:num_requests_running{" not in _running(httpx, url):  # the request is in the batch
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        thread.join(TIMEOUT_S)
        response = result["response"]
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 48  # finished, not cut off
        assert proc.wait(timeout=TIMEOUT_S) == 0
        with pytest.raises(httpx.TransportError):  # intake is closed
            httpx.get(url + "/health", timeout=2)
        engine_pid = int(re.search(r"engine process pid (\d+)", proc.stdout.read())[1])  # the default: on
        assert engine_pid != proc.pid
        with pytest.raises(ProcessLookupError):  # reaped, not orphaned
            os.kill(engine_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


def _running(httpx, url) -> str:
    """The running-requests gauge line when it is above zero, else ''."""
    text = httpx.get(url + "/metrics", timeout=5).text
    lines = [line for line in text.splitlines() if line.startswith("fms:num_requests_running{")]
    return lines[0] if lines and not lines[0].endswith(" 0.0") else ""


def test_lm_eval_on_the_shipped_data_on_cpu(tmp_path, capsys):
    """The README's lm-eval command: a local task file over the shipped MMLU items, the device from the model."""
    pytest.importorskip("lm_eval")
    out = tmp_path / "lm_eval.json"
    assert main(["eval", "lm-eval", "--architecture", "llama", "--variant", "micro", "--tasks", "mmlu", "--limit",
                 "1", "--device", "cpu", "--output", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["fms_mmlu_local"]
    assert result["sample_len"] == 2 and 0 <= result["acc,none"] <= 1  # one item of each subject's test CSV
    assert "fms_mmlu_local" in capsys.readouterr().out
    assert main(["eval", "lm-eval", "--variant", "micro", "--tasks", "hellaswag"]) == 2


def test_random_weights_with_a_larger_vocabulary_than_the_tokenizer():
    """fms serve --variant 3.2-1b with the shipped tokenizer: ids past its 2,048 decode as placeholders."""
    from fms.entrypoints.model_loading import WideVocabTokenizer
    from fms.serving.detokenizer import IncrementalDetokenizer

    tokenizer = WideVocabTokenizer(get_tokenizer(), 128256)
    ids = tokenizer.encode("Hello world") + [5000, 77, 128255]
    assert tokenizer.vocab_size == 128256 and tokenizer.eos_token_id == 2
    expected = get_tokenizer().decode(ids[:-3]) + " <5000>" + get_tokenizer().decode([77]) + " <128255>"
    assert tokenizer.decode(ids) == expected
    detokenizer = IncrementalDetokenizer(tokenizer, [1])
    detokenizer.add_tokens(ids[:3])
    detokenizer.add_tokens(ids[3:])
    assert detokenizer.text == expected
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([128256])
