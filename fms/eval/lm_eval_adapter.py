"""The lm-evaluation-harness model type "fms": any fms model, through any attention op, behind lm-eval's LM API.

lm-eval is an optional extra (`pip install ibm-fms[eval]`); fms never imports this module itself.
Importing it registers the model type:

    import lm_eval, fms.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="fms", model_args="architecture=hf_pretrained,model_path=ckpt,attn_name=paged",
                           tasks=["mmlu"])

From the shell, run lm-eval's own CLI through this module so the registration happens first:

    python -m fms.eval.lm_eval_adapter --model fms --model_args model_path=ckpt,attn_name=paged --tasks mmlu

Log-likelihoods come from fms.eval.scoring.score_requests (the same code scripts/eval.py runs);
generation from fms.utils.generation.generate.
"""

import json
import sys

import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from fms.models import get_model
from fms.eval.scoring import TokenRequest, encode_pair, score_requests
from fms.modules.attention import get_attention_op
from fms.utils.generation import generate
from fms.utils.tokenizers import get_tokenizer


def _as_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        raise ValueError(f"{name}='auto' is not supported by the fms model; give an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def _as_optional_bool(name: str, value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    if text in ("none", "auto", ""):
        return None
    raise ValueError(f"{name} must be true, false or none, got {value!r}")


class FMSLM(LM):
    """model_args: architecture, variant, model_path, tokenizer, attn_name (sdpa / flex / paged), device,
    dtype, batch_size, page_size (paged), max_length, max_gen_toks, add_bos, seed.

    `model` / `tokenizer` may also be given as objects through the Python API.
    """

    def __init__(
        self,
        architecture: str = "llama",
        variant: str | None = None,
        model_path: str | None = None,
        tokenizer=None,
        attn_name: str = "sdpa",
        device: str | None = None,
        dtype: str | None = None,
        batch_size=1,
        page_size=16,
        max_length=None,
        max_gen_toks=256,
        add_bos=None,
        seed=0,
        model=None,
        max_batch_size=None,  # passed by lm-eval's CLI; one fixed batch size is used
    ):
        super().__init__()
        if model is None:
            if architecture == "llama" and model_path and not variant:
                architecture = "hf_pretrained"
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = get_model(architecture, variant, model_path=model_path, device_type=device, data_type=dtype,
                              attn_name=attn_name, seed=_as_int("seed", seed, 0))
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = get_tokenizer(tokenizer or model_path)
        self.model = model
        self.tokenizer = tokenizer
        self.attn_name = attn_name
        self.batch_size = _as_int("batch_size", batch_size)
        self.cache_options = get_attention_op(attn_name).cache_kwargs(page_size=_as_int("page_size", page_size))
        context = model.config.max_position_embeddings
        self.max_length = min(_as_int("max_length", max_length), context) if max_length is not None else context
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.add_bos = _as_optional_bool("add_bos", add_bos)
        self._device = model.embedding.weight.device
        if tokenizer.vocab_size > model.config.vocab_size:
            # ids above the model's vocabulary would fail deep inside the embedding
            print(f"warning: tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}; "
                  f"requests that use ids beyond the model's are rejected", file=sys.stderr)

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", type(self.tokenizer).__name__)).replace("/", "__")

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    # -- log-likelihoods ----------------------------------------------------------------------
    def _score(self, token_requests, disable_tqdm: bool):
        run = score_requests(self.model, token_requests, self.attn_name, self.batch_size, self.cache_options,
                             progress=not disable_tqdm, desc="fms loglikelihood")
        return run.results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        token_requests = []
        for request in requests:
            context, continuation = request.args
            ctx, cont = encode_pair(self.tokenizer, context, continuation, self.add_bos)
            token_requests.append(TokenRequest(tuple(ctx), tuple(cont)))
        results = self._score(token_requests, disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood over disjoint windows of at most max_length tokens (lm-eval's scheme)."""
        token_requests, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tokenizer.encode(text, add_bos=False)
            windows = lm_eval_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            )
            for ctx, cont in map(lm_eval_utils.make_disjoint_window, windows):
                token_requests.append(TokenRequest(tuple(ctx), tuple(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(token_requests, disable_tqdm)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuation, cut before the first `until` string."""
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        progress = tqdm(total=len(requests), desc="fms generate_until", disable=disable_tqdm, file=sys.stderr)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1] or {})
            until = kwargs.pop("until", None)
            stops = [until] if isinstance(until, str) else list(until or [])
            max_new = _as_int("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in {self.max_length} tokens")
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            do_sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
            sampling = dict(do_sample=do_sample, temperature=temperature if do_sample else 1.0,
                            top_k=kwargs.pop("top_k", None) if do_sample else None,
                            top_p=kwargs.pop("top_p", None) if do_sample else None)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = []
                for i in chunk:
                    ids = self.tokenizer.encode(requests[i].args[0], add_bos=self.add_bos)
                    prompts.append(ids[-(self.max_length - max_new):] or [self.prefix_token_id])
                new_tokens = generate(self.model, prompts, max_new, eos_token_id=self.tokenizer.eos_token_id,
                                      attn_name=self.attn_name, **sampling, **self.cache_options)
                for i, tokens in zip(chunk, new_tokens):
                    # a model's vocabulary may be padded past the tokenizer's; such ids have no text
                    text = self.tokenizer.decode([t for t in tokens if t < self.tokenizer.vocab_size])
                    for stop in stops:
                        if stop:
                            text = text.split(stop)[0]
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(chunk))
        progress.close()
        return outputs


if __name__ == "__main__":
    # Run as a script this file is `__main__`; register the importable class, not this copy of it.
    import importlib

    from lm_eval.__main__ import cli_evaluate

    importlib.import_module("fms.eval.lm_eval_adapter")

    cli_evaluate()
else:
    register_model("fms")(FMSLM)
