"""Chat templates: found beside the checkpoint's tokenizer (as the HF tokenizer stack stores them) or given
by --chat-template, rendered with Jinja2 in the sandbox and with the names transformers' apply_chat_template
passes (messages, add_generation_prompt, bos_token, eos_token, raise_exception)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

# Where HF checkpoints keep the template: tokenizer_config.json's "chat_template" (a string, or a list of
# {"name", "template"} where "default" is used), or its own file (newer transformers).
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class ChatTemplateError(ValueError):
    """No template, or a template that cannot render these messages (HTTP 400)."""


def find_chat_template(folder: str | Path | None) -> str | None:
    """The chat template stored with the tokenizer in `folder`, or None."""
    if folder is None:
        return None
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ChatTemplateError(f"{path} is not a JSON object: {e}") from None
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
    return None


def load_chat_template(override: str | None, tokenizer_folder: str | Path | None) -> str | None:
    """--chat-template (a file, or the template itself when it is no file, as vLLM takes it) wins over the
    tokenizer's template."""
    if override:
        path = Path(override)
        if path.is_file():
            return path.read_text()
        if "{" not in override:
            raise ChatTemplateError(f"--chat-template {override!r} is neither a file nor a Jinja template")
        return override
    return find_chat_template(tokenizer_folder)


def special_token_texts(tokenizer) -> dict[str, str | None]:
    """The bos_token / eos_token texts a template is rendered with (None where there is no tokenizer or it
    has no such token): render_chat(template, messages, **special_token_texts(tokenizer))."""
    def text(token_id):
        return tokenizer.decode([token_id], skip_special_tokens=False) if token_id is not None else None

    if tokenizer is None:
        return {"bos_token": None, "eos_token": None}
    return {"bos_token": text(tokenizer.bos_token_id), "eos_token": text(tokenizer.eos_token_id)}


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)

    def raise_exception(message):
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, **extra) -> str:
    """The prompt text of a conversation ([{"role": ..., "content": ...}, ...])."""
    if template is None:
        raise ChatTemplateError("this model has no chat template (none in its tokenizer files); start the server "
                                "with --chat-template FILE, or use /v1/completions")
    from jinja2 import TemplateError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token or "", eos_token=eos_token or "", **extra)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
