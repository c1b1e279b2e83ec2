"""Tests for fms.utils.tokenizers, the shipped tokenizer, and the tokenizer scripts."""

import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fms.utils.tokenizers import (
    DEFAULT_TOKENIZER_PATH,
    BaseTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    get_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts"
SHIPPED = Path(DEFAULT_TOKENIZER_PATH)

ROUND_TRIP_TEXTS = [
    "",
    "Hello, world!",
    "The attention cache hands out pages of keys and values.",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines",
    "non\u00a0breaking space and a zero\u200bwidth one",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00dcbergr\u00f6\u00dfe",
    "e\u0301 combining accent vs \u00e9 precomposed",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587 \ud55c\uad6d\uc5b4",
    "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd right-to-left",
    "emoji \U0001f680\U0001f469\u200d\U0001f4bb\U0001f1ef\U0001f1f5 \U0001f44d\U0001f3fd",
    'def f(x):\n    return {"page_size": 16, "ids": [1, 2, 3]}\n',
    "numbers 3.14159 1e-9 -42 0x1F 2048",
    "\x00\x01\x7f control characters",
]


@pytest.fixture(scope="module")
def shipped() -> HFTokenizer:
    return get_tokenizer()


# ----------------------------------------------------------------------------- shipped tokenizer


def test_default_names_the_shipped_tokenizer(shipped):
    assert isinstance(shipped, HFTokenizer)
    assert isinstance(get_tokenizer("default"), HFTokenizer)
    assert get_tokenizer(DEFAULT_TOKENIZER_PATH).encode("same ids") == shipped.encode("same ids")
    assert shipped.vocab_size == 2048
    assert (shipped.bos_token_id, shipped.eos_token_id, shipped.pad_token_id) == (1, 2, 3)
    assert shipped.decode([0, 1, 2, 3], skip_special_tokens=False) == "<unk><s></s><pad>"


def test_shipped_files_are_small_and_documented():
    for name in ("tokenizer.json", "tokenizer_config.json", "corpus.txt", "README.md"):
        assert (SHIPPED / name).is_file(), name
    total = sum(p.stat().st_size for p in SHIPPED.iterdir() if p.is_file())
    assert total < 500_000


def test_shipped_tokenizer_learned_its_corpus(shipped):
    # Frequent corpus words are single tokens; a byte-only tokenizer would use one per byte.
    for word in (" attention", " cache", " memory", " the"):
        assert len(shipped.encode(word, add_bos=False)) == 1, word
    corpus = (SHIPPED / "corpus.txt").read_text(encoding="utf-8")
    assert len(shipped.encode(corpus, add_bos=False)) < len(corpus.encode()) / 3


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_shipped_round_trip(shipped, text):
    ids = shipped.encode(text)
    assert ids[0] == shipped.bos_token_id
    assert shipped.decode(ids) == text
    assert shipped.decode(shipped.encode(text, add_bos=False)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_shipped_round_trip_any_unicode(shipped, text):
    ids = shipped.encode(text, add_bos=False)
    # Special-token strings typed in the text become special ids (as in
    # transformers), so keep them in the output to compare.
    assert shipped.decode(ids, skip_special_tokens=False) == text
    assert all(0 <= i < shipped.vocab_size for i in ids)


def test_shipped_bos_handling(shipped):
    plain = shipped.encode("page table", add_bos=False)
    assert plain and shipped.bos_token_id not in plain
    assert shipped.encode("page table") == [1, *plain]
    assert shipped.encode("page table", add_bos=True) == [1, *plain]
    assert shipped.encode("") == [1]
    assert shipped.encode("", add_bos=False) == []
    assert shipped.eos_token_id not in shipped.encode("page table")


def test_decode_special_tokens_and_tensors(shipped):
    ids = [shipped.bos_token_id, *shipped.encode("the end", add_bos=False), shipped.eos_token_id]
    assert shipped.decode(ids) == "the end"
    assert shipped.decode(ids, skip_special_tokens=False) == "<s>the end</s>"
    assert shipped.decode(torch.tensor(ids)) == "the end"
    assert shipped.decode([]) == ""


@pytest.mark.parametrize(
    "ids, error, message",
    [
        ([5, 2048], ValueError, "token id 2048 at position 1 is out of range: ids must be in [0, 2048)"),
        ([-1], ValueError, "token id -1 at position 0 is out of range"),
        ([1.5], TypeError, "integer token ids, got 1.5 (float) at position 0"),
        # lists of Python ints are checked by a fast path; anything else in the list still gets the per-id check
        ([5, 7.0], TypeError, "integer token ids, got 7.0 (float) at position 1"),
        ([5, 6, 2047, 2048, 3], ValueError, "token id 2048 at position 3 is out of range"),
        ([9, -4, 9], ValueError, "token id -4 at position 1 is out of range"),
    ],
)
def test_decode_rejects_bad_ids(shipped, ids, error, message):
    with pytest.raises(error) as info:
        shipped.decode(ids)
    assert message in str(info.value)


def test_encode_rejects_non_text(shipped):
    with pytest.raises(TypeError, match="encode expects a str, got bytes"):
        shipped.encode(b"bytes")


def test_train_script_reproduces_shipped_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "train_tokenizer.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no "asked for 2048, got fewer" warning
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name


@pytest.mark.hf
def test_shipped_matches_transformers(shipped):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_PATH)
    assert (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (1, 2, 3)
    for text in ROUND_TRIP_TEXTS:
        ids = reference(text)["input_ids"]
        assert shipped.encode(text) == ids
        assert shipped.decode(ids) == reference.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- SentencePiece

SP_CORPUS = [
    "the cache holds keys and values for every token",
    "pages of the cache are handed out by the allocator",
    "a tokenizer turns text into ids and back again",
    "the scheduler admits new requests when pages are free",
]


@pytest.fixture(scope="module")
def sp_model_dir(tmp_path_factory) -> Path:
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    # Llama-2's settings: byte fallback, no normalisation, <unk>/<s>/</s> = 0/1/2, no pad.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 5),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("sp")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


def test_sentencepiece_through_get_tokenizer(sp_model_dir):
    by_file = get_tokenizer(str(sp_model_dir / "tokenizer.model"))
    by_folder = get_tokenizer(sp_model_dir)
    for tokenizer in (by_file, by_folder):
        assert isinstance(tokenizer, SentencePieceTokenizer)
        assert isinstance(tokenizer, BaseTokenizer)
    assert by_file.vocab_size == 300
    assert (by_file.bos_token_id, by_file.eos_token_id, by_file.pad_token_id) == (1, 2, None)


@pytest.mark.parametrize("text", ["the cache pages", " two  spaces ", "caf\u00e9 \u65e5\u672c \U0001f680", "", "\ttab\nline"])
def test_sentencepiece_round_trip_and_bos(sp_model_dir, text):
    tokenizer = get_tokenizer(sp_model_dir)
    plain = tokenizer.encode(text, add_bos=False)
    assert tokenizer.encode(text) == [1, *plain]  # Llama-2: BOS by default
    assert tokenizer.encode(text, add_bos=True) == [1, *plain]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(plain) == text


def test_sentencepiece_decode_special_tokens(sp_model_dir):
    tokenizer = get_tokenizer(sp_model_dir)
    ids = [1, *tokenizer.encode("the cache", add_bos=False), 2]
    assert tokenizer.decode(ids) == "the cache"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>the cache</s>"
    with pytest.raises(ValueError, match=r"token id 300 at position 0 is out of range: ids must be in \[0, 300\)"):
        tokenizer.decode([300])


def test_sentencepiece_rejects_a_non_sentencepiece_model(tmp_path):
    # Llama-3's original/tokenizer.model is tiktoken text, not a SentencePiece proto.
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(ValueError) as info:
        get_tokenizer(bad)
    assert str(bad) in str(info.value) and "not a SentencePiece model" in str(info.value)


# ----------------------------------------------------------------------------- HF tokenizer.json


def _build_hf_tokenizer(
    folder: Path,
    specials: list[str],
    bos_template: str | None,
    configs: dict[str, dict] | None = None,
    padding: bool = False,
) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SP_CORPUS, trainer)
    if bos_template is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_template} $A", special_tokens=[(bos_template, tokenizer.token_to_id(bos_template))]
        )
    if padding:
        tokenizer.enable_padding(length=64)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    for name, config in (configs or {}).items():
        (folder / name).write_text(json.dumps(config))
    return folder


def test_hf_folder_with_llama3_style_config(tmp_path):
    begin, end, pad = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
    folder = _build_hf_tokenizer(
        tmp_path / "llama3",
        [begin, end, pad],
        bos_template=begin,
        configs={
            # transformers writes either plain strings or AddedToken dicts.
            "tokenizer_config.json": {"bos_token": {"content": begin, "lstrip": False}, "eos_token": end},
            "special_tokens_map.json": {"pad_token": {"content": pad}, "eos_token": "ignored, config wins"},
        },
    )
    tokenizer = get_tokenizer(folder)
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    plain = tokenizer.encode("the cache", add_bos=False)
    assert plain and 0 not in plain
    assert tokenizer.encode("the cache") == [0, *plain]  # the post-processor adds BOS
    assert tokenizer.encode("the cache", add_bos=True) == [0, *plain]
    assert tokenizer.decode(tokenizer.encode("the cache")) == "the cache"
    assert tokenizer.decode([0, *plain, 1], skip_special_tokens=False) == f"{begin}the cache{end}"


def test_hf_granite_style_without_bos_post_processor(tmp_path):
    end = "<|end_of_text|>"
    folder = _build_hf_tokenizer(
        tmp_path / "granite",
        [end],
        bos_template=None,
        configs={"tokenizer_config.json": {"bos_token": end, "eos_token": end, "pad_token": end}},
    )
    tokenizer = get_tokenizer(folder / "tokenizer.json")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 0, 0)
    plain = tokenizer.encode("the cache")
    assert 0 not in plain  # nothing added by default
    assert tokenizer.encode("the cache", add_bos=False) == plain
    assert tokenizer.encode("the cache", add_bos=True) == [0, *plain]


def test_hf_without_configs_infers_special_tokens(tmp_path):
    folder = _build_hf_tokenizer(tmp_path / "bare", ["<unk>", "<s>", "</s>"], bos_template="<s>", padding=True)
    tokenizer = get_tokenizer(folder)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, None)
    # The file was saved with padding to 64 on; an inference tokenizer must ignore it.
    assert len(tokenizer.encode("the cache", add_bos=False)) < 10


def test_hf_without_bos_rejects_add_bos(tmp_path):
    folder = _build_hf_tokenizer(tmp_path / "nobos", ["<unk>"], bos_template=None)
    tokenizer = get_tokenizer(folder)
    assert tokenizer.bos_token_id is None
    assert tokenizer.encode("the", add_bos=False) == tokenizer.encode("the")
    with pytest.raises(ValueError, match="add_bos=True but HFTokenizer.*has no BOS token"):
        tokenizer.encode("the", add_bos=True)


def test_hf_config_naming_unknown_token(tmp_path):
    folder = _build_hf_tokenizer(
        tmp_path / "wrong", ["<s>"], bos_template=None, configs={"tokenizer_config.json": {"eos_token": "<missing>"}}
    )
    with pytest.raises(ValueError, match="eos_token '<missing>' .* is not in its vocabulary"):
        get_tokenizer(folder)


def test_folder_prefers_tokenizer_json(tmp_path, sp_model_dir):
    folder = _build_hf_tokenizer(tmp_path / "both", ["<s>"], bos_template="<s>")
    (folder / "tokenizer.model").write_bytes((sp_model_dir / "tokenizer.model").read_bytes())
    assert isinstance(get_tokenizer(folder), HFTokenizer)


# ----------------------------------------------------------------------------- bad paths


def test_missing_path_error_names_path_and_formats(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError) as info:
        get_tokenizer(str(missing))
    message = str(info.value)
    assert str(missing) in message and "tokenizer.json" in message and "tokenizer.model" in message


def test_empty_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds neither tokenizer.json nor tokenizer.model") as info:
        get_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unknown_file_type_error(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"cannot tell the format of .*vocab\.txt: expected a tokenizer\.json"):
        get_tokenizer(vocab)


def test_corrupt_tokenizer_json_error(tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="is not a tokenizers tokenizer.json file"):
        get_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- download script


def _free_port() -> int:
    # Bound then released: nothing listens there, so connecting is refused at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_download(tmp_path: Path, *args: str, prefix: list[str] | None = None, **env: str):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    clean.update(HF_HOME=str(tmp_path / "hf_home"), **env)
    command = prefix or [sys.executable, str(SCRIPTS / "download_tokenizer.py")]
    return subprocess.run(
        [*command, "--out", str(tmp_path / "out"), *args], env=clean, capture_output=True, text=True, timeout=20
    )


def _assert_one_clear_line(result, *phrases: str):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_download_with_hub_unreachable(tmp_path):
    pytest.importorskip("huggingface_hub")
    result = _run_download(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{_free_port()}")
    _assert_one_clear_line(result, "cannot reach the hub", "meta-llama/Llama-2-7b-hf", "by hand", str(tmp_path / "out"))


def test_download_with_hub_offline(tmp_path):
    pytest.importorskip("huggingface_hub")
    result = _run_download(tmp_path, HF_HUB_OFFLINE="1")
    _assert_one_clear_line(result, "HF_HUB_OFFLINE is set", "tokenizer.model", "by hand")


def test_download_without_huggingface_hub(tmp_path):
    hide_hub = (
        "import runpy, sys; sys.modules['huggingface_hub'] = None; "
        f"runpy.run_path({str(SCRIPTS / 'download_tokenizer.py')!r}, run_name='__main__')"
    )
    result = _run_download(tmp_path, prefix=[sys.executable, "-c", hide_hub])
    _assert_one_clear_line(result, "huggingface_hub is not installed", "pip install huggingface_hub")


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers like the hub: org/gated is gated, org/ok serves only the files in `files`."""

    files: dict[str, bytes] = {}

    def log_message(self, *args):
        pass

    def _reply(self, send_body: bool):
        if "/resolve/" not in self.path:
            return self._empty(200, {})
        if self.path.startswith("/org/gated/"):
            return self._empty(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"})
        body = self.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            return self._empty(404, {"X-Error-Code": "EntryNotFound"})
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{len(body)}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _empty(self, status: int, headers: dict[str, str]):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        self._reply(send_body=False)

    def do_GET(self):
        self._reply(send_body=True)


@pytest.fixture(scope="module")
def fake_hub():
    pytest.importorskip("huggingface_hub")
    _FakeHub.files = {name: (SHIPPED / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_gated_repo_without_token(tmp_path, fake_hub):
    result = _run_download(tmp_path, "--repo", "org/gated", HF_ENDPOINT=fake_hub)
    _assert_one_clear_line(result, "org/gated is gated", "HF_TOKEN is not set", "accept the license", "by hand")


def test_download_fetches_files_a_repo_has(tmp_path, fake_hub, shipped):
    # org/ok has no tokenizer.model (like Granite): tokenizer.json alone is enough.
    result = _run_download(tmp_path, "--repo", "org/ok", HF_ENDPOINT=fake_hub)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (SHIPPED / "tokenizer.json").read_bytes()
    assert not (out / "tokenizer.model").exists()
    assert get_tokenizer(out).encode("fetched text") == shipped.encode("fetched text")
