"""The `fms` command: serve, generate, bench {serve,throughput,latency,static,startup,targets,gemv}, eval.

    fms serve --architecture llama --variant micro --port 8000     an OpenAI-compatible server
    fms generate ./checkpoint --prompt "Hello"                      prompts in, text out
    fms bench serve --port 8000 --num-prompts 64                    load against a running server
    fms bench throughput | latency | static                         offline engine / static batches
    fms eval --task mmlu --data fms/resources/eval/mmlu             accuracy (local data only)
    fms eval lm-eval --architecture llama --variant micro --tasks mmlu   lm-evaluation-harness, local data
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from fms.distributed import RankFailedError
from fms.entrypoints.commands import LOG_FORMAT, generate_outputs, sampling_params, serve_engine
from fms.entrypoints.engine_args import add_engine_arguments, add_model_arguments, build_engine, engine_config
from fms.entrypoints.engine_process import EngineProcessError

DEFAULT_MAX_WAITING = 1024
DEFAULT_BURST_WAIT_MS = 25.0  # AsyncEngine._hold_burst: enough for a 1B model's 8,192-token first step (session 25)

SUBCOMMANDS = {
    "serve": "start the OpenAI-compatible HTTP server",
    "generate": "generate text for prompts with the engine",
    "bench": "benchmarks: serve (load generator), throughput (offline engine), latency (one batch), static",
    "eval": "accuracy of a model on local task data (MMLU, TruthfulQA, summarization); "
            "`fms eval lm-eval` runs lm-evaluation-harness on it",
}
BENCH_SUBCOMMANDS = {
    "serve": "a load generator against a running server (TTFT, TPOT, ITL, throughput, goodput)",
    "throughput": "offline serving throughput of the engine (scripts/benchmark_serving.py)",
    "latency": "end-to-end latency of one batch on the engine",
    "static": "static-batch inference per attention op (scripts/benchmark_inference.py)",
    "startup": "engine start-up by phase, cold and warm, in fresh processes (scripts/bench_startup.py)",
    "targets": "issue 19's table of targets: each row's benchmark run, met or not (scripts/bench_targets.py)",
    "gemv": "the decode GEMV kernel against cuBLAS per block size on this GPU; --write_table FOLDER writes its table "
            "(FMS_GEMV_TABLE_DIR)",
}


class CommandError(Exception):
    """A bad command line, reported as `error: ...` with exit status 2."""


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fms", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text)
    return p


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fms bench", description="Benchmarks.")
    sub = p.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name, help_text in BENCH_SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text)
    return p


# -- fms serve ----------------------------------------------------------------------------------------
def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fms serve", description="Serve a model over an OpenAI-compatible HTTP API "
                                "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).")
    add_model_arguments(p)
    add_engine_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None,
                   help="the name clients pass as `model` (default: the model argument, or ARCH-VARIANT)")
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file (or the template itself); default: the tokenizer's")
    g.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help="most requests queued before running; more get HTTP 429 with Retry-After")
    g.add_argument("--burst-wait-ms", type=float, default=DEFAULT_BURST_WAIT_MS,
                   help="at most how long an idle engine holds its first step while a burst of requests is still "
                        "arriving, so that the burst starts with a full prefill step (a lone request waits 3 ms at "
                        "most); 0: never")
    g.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine loop in a process of its own (as vLLM's EngineCore), so that it and the "
                        "HTTP work (routes, SSE, JSON, detokenizing) do not share one GIL; --no-engine-process runs "
                        "it in a thread of the server process. Default: on; with --tensor-parallel-size > 1 off "
                        "(rank 0's process holds both: the ranks are processes already), and on is refused there")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before they are aborted")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def serve_main(argv: list[str]) -> int:
    from fms.entrypoints.chat import load_chat_template

    args = serve_parser().parse_args(argv)
    if args.max_waiting < 0:
        raise CommandError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if not 0 <= args.burst_wait_ms <= 1000:
        raise CommandError(f"--burst-wait-ms must be in [0, 1000], got {args.burst_wait_ms}")
    engine_config(args)  # bad engine options fail before any model loads or process starts
    chat_template = load_chat_template(args.chat_template, None)  # so does a bad template file
    if args.tensor_parallel_size > 1:
        if args.engine_process:
            raise CommandError(f"--engine-process is not supported with --tensor-parallel-size "
                               f"{args.tensor_parallel_size} (rank 0 runs the engine loop in a thread of its own "
                               "process); leave it out or pass --no-engine-process")
        from fms.entrypoints.tensor_parallel import launch_serve

        return launch_serve(args)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if args.engine_process is not False:
        from fms.entrypoints.engine_process import serve_with_engine_process

        return serve_with_engine_process(args, chat_template)
    engine, loaded = build_engine(args)
    return serve_engine(args, chat_template, engine, loaded)


# -- fms generate -------------------------------------------------------------------------------------
def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fms generate", description="Prompts in, text out (on the serving engine).")
    add_model_arguments(p)
    add_engine_arguments(p)
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", default=None, help="repeat for several prompts")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    g.add_argument("--chat-template", default=None, help="with --chat: a template file (default: the tokenizer's)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeat for several)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, help="top alternatives per token to report (0-20)")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


def generate_main(argv: list[str]) -> int:
    args = generate_parser().parse_args(argv)
    sampling_params(args)  # bad sampling or engine options fail before any model loads or process starts
    engine_config(args)
    if args.tensor_parallel_size > 1:
        from fms.entrypoints.tensor_parallel import launch_generate

        texts, outputs = launch_generate(args)
    else:
        texts, outputs = generate_outputs(args)
    for text, out in zip(texts, outputs):
        if args.json:
            record = {"prompt": text, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}
            if out.logprobs is not None:
                record["logprobs"] = [{"logprob": lp.logprob, "top": lp.top} for lp in out.logprobs]
            print(json.dumps(record))
        else:
            print(f"{text}{out.text}" if not args.chat else f"{text}\n> {out.text}")
    return 0


# -- dispatch -----------------------------------------------------------------------------------------
def _bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        _bench_parser().print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "serve":
        from fms.entrypoints.bench_serve import add_arguments, run_from_args

        p = argparse.ArgumentParser(prog="fms bench serve", description=BENCH_SUBCOMMANDS["serve"])
        add_arguments(p)
        report = run_from_args(p.parse_args(rest), rest)
        return 0 if report["completed"] and not report["failed"] else 1
    if name not in BENCH_SUBCOMMANDS:
        raise CommandError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCH_SUBCOMMANDS)}")
    from fms.entrypoints import bench_cli

    if name == "throughput":
        bench_cli.throughput_main(rest)
    elif name == "latency":
        bench_cli.latency_main(rest)
    elif name == "startup":
        bench_cli.startup_main(rest)
    elif name == "targets":
        bench_cli.targets_main(rest)
    elif name == "gemv":
        from fms.bench.gemv import main as gemv_main

        gemv_main(rest, prog="fms bench gemv")
    else:
        bench_cli.static_main(rest)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "serve":
            return serve_main(rest)
        if command == "generate":
            return generate_main(rest)
        if command == "bench":
            return _bench(rest)
        if command == "eval":
            if rest[:1] == ["lm-eval"]:
                from fms.entrypoints.lm_eval_run import main as lm_eval_main

                lm_eval_main(rest[1:])
                return 0
            from fms.entrypoints.bench_cli import eval_cli

            return eval_cli(rest)
        raise CommandError(f"unknown command {command!r}; choose one of {', '.join(SUBCOMMANDS)} (fms --help)")
    except (CommandError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RankFailedError, EngineProcessError) as e:  # a rank or the engine process failed; it was reaped
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
