"""Text <-> token ids behind one interface: SentencePiece models, HF tokenizer.json files, and the shipped default."""

import abc
import json
import operator
import os
from pathlib import Path
from typing import Any, Iterable

DEFAULT_TOKENIZER_PATH = str(Path(__file__).resolve().parent.parent / "resources" / "tokenizer")

_HF_FILE = "tokenizer.json"
_SP_FILE = "tokenizer.model"
# Used only when a tokenizer.json comes without tokenizer_config.json / special_tokens_map.json.
_KNOWN_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>")


class BaseTokenizer(abc.ABC):
    """Encode text to ids and decode ids to text; subclasses wrap one tokenizer library."""

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. `add_bos=None` follows the tokenizer's own convention."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if add_bos and self.bos_token_id is None:
            raise ValueError(f"add_bos=True but {self!r} has no BOS token; pass add_bos=False or None")
        return self._encode(text, add_bos)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list of ints, or a 1-D integer tensor)."""
        return self._decode(self._check_ids(ids), skip_special_tokens)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def bos_token_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def eos_token_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def pad_token_id(self) -> int | None: ...

    @abc.abstractmethod
    def _encode(self, text: str, add_bos: bool | None) -> list[int]: ...

    @abc.abstractmethod
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        # Both libraries misbehave on bad ids (tokenizers silently drops them,
        # sentencepiece raises an opaque IndexError), so check here once.
        # The vocabulary size is read once per call, not per id: a server decodes every few tokens of
        # every request, and the property is a call into the tokenizer library.
        vocab_size = self.vocab_size
        checked = []
        for position, token_id in enumerate(ids):
            try:
                token_id = operator.index(token_id)
            except TypeError:
                raise TypeError(
                    f"decode expects integer token ids, got {token_id!r} ({type(token_id).__name__}) at position {position}"
                ) from None
            if not 0 <= token_id < vocab_size:
                raise ValueError(
                    f"token id {token_id} at position {position} is out of range: ids must be in [0, {vocab_size})"
                )
            checked.append(token_id)
        return checked


class SentencePieceTokenizer(BaseTokenizer):
    """A SentencePiece `tokenizer.model` (Llama-2 style); BOS is added unless asked otherwise."""

    def __init__(self, path: str | os.PathLike, add_bos_by_default: bool = True):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError(f"loading {path} needs sentencepiece: pip install sentencepiece") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"SentencePiece model {self.path} does not exist (expected a tokenizer.model file)")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (RuntimeError, OSError) as exc:
            raise ValueError(
                f"{self.path} is not a SentencePiece model ({exc}). Note that Llama-3's original/tokenizer.model "
                f"is tiktoken format: load the repo's tokenizer.json instead"
            ) from None
        self.add_bos_by_default = add_bos_by_default

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r})"

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    # sentencepiece reports a disabled special token as id -1.
    @property
    def bos_token_id(self) -> int | None:
        return _none_if_negative(self._sp.bos_id())

    @property
    def eos_token_id(self) -> int | None:
        return _none_if_negative(self._sp.eos_id())

    @property
    def pad_token_id(self) -> int | None:
        return _none_if_negative(self._sp.pad_id())

    def _encode(self, text: str, add_bos: bool | None) -> list[int]:
        if add_bos is None:
            add_bos = self.add_bos_by_default and self.bos_token_id is not None
        ids = self._sp.encode(text, out_type=int)
        return [self.bos_token_id, *ids] if add_bos else ids

    def _is_special(self, token_id: int) -> bool:
        # Matches transformers' notion of special for Llama: bos/eos/pad (control) and unk.
        return self._sp.is_control(token_id) or self._sp.is_unknown(token_id)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if not self._is_special(i)])
        # sentencepiece renders control tokens as "", so decode the text between
        # them and splice their piece strings back in.
        parts, run = [], []
        for token_id in ids:
            if self._is_special(token_id):
                parts.append(self._sp.decode(run))
                parts.append(self._sp.id_to_piece(token_id))
                run = []
            else:
                run.append(token_id)
        parts.append(self._sp.decode(run))
        return "".join(parts)


class HFTokenizer(BaseTokenizer):
    """An HF `tokenizer.json` (tokenizers library) plus the special tokens named next to it.

    BOS follows the file's post-processor unless `add_bos` says otherwise. Special-token
    strings inside the text (e.g. "<s>") are encoded as those special tokens, as
    transformers does, so chat templates keep working.
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        path = Path(path)
        self.path = path / _HF_FILE if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist (expected a {_HF_FILE} file or a folder holding one)")
        try:
            self._tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as exc:
            raise ValueError(f"{self.path} is not a tokenizers {_HF_FILE} file: {exc}") from None
        # Some hub files are saved with padding or truncation switched on; an
        # inference tokenizer must return exactly the prompt's tokens.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

        prefix, suffix = self._post_processor_additions()
        names = _read_special_tokens(self.path.parent)
        self._bos_token_id = self._resolve(names, "bos_token")
        if self._bos_token_id is None and prefix:
            self._bos_token_id = prefix[0]
        self._eos_token_id = self._resolve(names, "eos_token")
        if self._eos_token_id is None and "eos_token" not in names:
            self._eos_token_id = suffix[-1] if suffix else self._first_known(_KNOWN_EOS_TOKENS)
        self._pad_token_id = self._resolve(names, "pad_token")
        self._adds_bos = self._bos_token_id is not None and prefix[:1] == [self._bos_token_id]

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_token_id

    @property
    def adds_bos_by_default(self) -> bool:
        return self._adds_bos

    def _encode(self, text: str, add_bos: bool | None) -> list[int]:
        # Always run the post-processor so any other tokens it adds survive;
        # only the leading BOS is forced on or off.
        ids = self._tokenizer.encode(text, add_special_tokens=True).ids
        if add_bos and not self._adds_bos:
            ids = [self._bos_token_id, *ids]
        elif add_bos is False and self._adds_bos and ids[:1] == [self._bos_token_id]:
            ids = ids[1:]
        return ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _post_processor_additions(self) -> tuple[list[int], list[int]]:
        """Ids the post-processor puts before and after the text's own ids."""
        probe = "a"
        plain = self._tokenizer.encode(probe, add_special_tokens=False).ids
        full = self._tokenizer.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []

    def _resolve(self, names: dict[str, str | None], key: str) -> int | None:
        content = names.get(key)
        if content is None:
            return None
        token_id = self._tokenizer.token_to_id(content)
        if token_id is None:
            raise ValueError(
                f"{key} {content!r} from the configs next to {self.path} is not in its vocabulary "
                f"(fix tokenizer_config.json / special_tokens_map.json)"
            )
        return token_id

    def _first_known(self, candidates: Iterable[str]) -> int | None:
        for content in candidates:
            token_id = self._tokenizer.token_to_id(content)
            if token_id is not None:
                return token_id
        return None


def _none_if_negative(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _token_content(value: Any, source: Path, key: str) -> str | None:
    # transformers writes special tokens either as plain strings or as
    # serialized AddedToken dicts ({"content": ..., "lstrip": ..., ...}).
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: {key} is {value!r}; expected a string, null, or an object with a 'content' string")


def _read_special_tokens(folder: Path) -> dict[str, str | None]:
    """bos/eos/pad/unk names from the transformers configs in `folder`; absent keys are left out.

    tokenizer_config.json wins over special_tokens_map.json, as in current transformers.
    """
    names: dict[str, str | None] = {}
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        source = folder / filename
        if not source.is_file():
            continue
        try:
            config = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{source} holds a {type(config).__name__}; expected a JSON object")
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if key in config and key not in names:
                names[key] = _token_content(config[key], source, key)
    return names


def get_tokenizer(name_or_path: str | os.PathLike | None = None) -> BaseTokenizer:
    """The tokenizer named by `name_or_path`.

    None or "default": the small byte-level BPE shipped with fms. A tokenizer.json
    file: HFTokenizer. A tokenizer.model file: SentencePieceTokenizer. A folder:
    whichever of those two it holds, tokenizer.json first.
    """
    if name_or_path is None or name_or_path == "default":
        return HFTokenizer(DEFAULT_TOKENIZER_PATH)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / _HF_FILE).is_file():
            return HFTokenizer(path)
        if (path / _SP_FILE).is_file():
            return SentencePieceTokenizer(path / _SP_FILE)
        raise FileNotFoundError(f"folder {path} holds neither {_HF_FILE} nor {_SP_FILE}")
    if path.is_file():
        if path.suffix == ".json":
            return HFTokenizer(path)
        if path.suffix == ".model":
            return SentencePieceTokenizer(path)
        raise ValueError(
            f"cannot tell the format of {path}: expected a {_HF_FILE} (*.json) or {_SP_FILE} (*.model) file, "
            f"or a folder holding one"
        )
    raise FileNotFoundError(
        f"tokenizer {str(name_or_path)!r} not found: expected 'default', a path to {_HF_FILE} or {_SP_FILE}, "
        f"or a folder holding one (hub tokenizers: scripts/download_tokenizer.py --repo REPO --out DIR)"
    )
