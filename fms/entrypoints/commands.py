"""What `fms serve` and `fms generate` do once their arguments are checked: in the one process, or on each
tensor-parallel rank (fms.entrypoints.tensor_parallel)."""

from __future__ import annotations

import logging
import sys

from fms.entrypoints.engine_args import build_engine

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def serve_engine(args, chat_template, engine, loaded, followers=None, note: str = "") -> int:
    """Serve this engine until SIGTERM / Ctrl-C (under tensor parallel: on rank 0, with the other ranks as
    followers of its engine loop)."""
    from fms.entrypoints.chat import load_chat_template
    from fms.entrypoints.openai.server import make_state, run_server

    if chat_template is None:
        chat_template = load_chat_template(None, loaded.tokenizer_folder)
    if loaded.checkpoint is None:
        logging.getLogger("fms").warning("%s has random weights: the text will be gibberish", loaded.name)
    state = make_state(engine, args.served_model_name or loaded.name, chat_template, args.max_waiting, followers,
                       burst_wait_s=args.burst_wait_ms / 1e3)
    print(f"serving {state.model_name} on http://{args.host}:{args.port} (OpenAI API under /v1){note}", flush=True)
    return run_server(state, args.host, args.port, args.log_level, args.shutdown_timeout)


def sampling_params(args):
    from fms.serving import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed, stop=args.stop or (),
                          ignore_eos=args.ignore_eos, logprobs=args.logprobs)


def generate_outputs(args, show_note: bool = True) -> tuple[list[str], list]:
    """The prompts' texts and their outputs (under tensor parallel: the same call on every rank)."""
    from fms.entrypoints.chat import load_chat_template, render_chat, special_token_texts

    params = sampling_params(args)
    engine, loaded = build_engine(args)
    if loaded.checkpoint is None and show_note:
        print(f"note: {loaded.name} has random weights; the text will be gibberish", file=sys.stderr)
    texts = args.prompt or ["Paged attention keeps the KV cache"]
    prompts: list = list(texts)
    if args.chat:
        template = load_chat_template(args.chat_template, loaded.tokenizer_folder)
        tok = loaded.tokenizer
        bos = special_token_texts(tok)["bos_token"]
        prompts = [tok.encode(render_chat(template, [{"role": "user", "content": t}], bos_token=bos), add_bos=False)
                   for t in texts]
    return texts, engine.generate(prompts, params, use_tqdm=False)
