"""Request bodies of the OpenAI-compatible API (OpenAI's fields plus vLLM's extras), and the error shape.

Unknown fields are ignored, as OpenAI and vLLM do. Fields we take but cannot honour (n > 1, penalties,
logit_bias, tools, echo, suffix) are refused with a 400 that names them, rather than ignored.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

from fms.runtime.sampling_params import MAX_LOGPROBS, SamplingParams


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type_ or {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
                              503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = 0.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    repetition_penalty: float | None = 1.0

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(400, f"n={self.n} is not supported: this server returns one choice per prompt (n=1)", "n")
        for name in ("presence_penalty", "frequency_penalty", "min_p"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name}={getattr(self, name)} is not supported (only 0)", name)
        if self.repetition_penalty not in (None, 1, 1.0):
            raise ApiError(400, f"repetition_penalty={self.repetition_penalty} is not supported (only 1)",
                           "repetition_penalty")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """SamplingParams of this body (OpenAI's defaults: temperature 1, top_p 1); ValueError -> 400."""
        top_k = self.top_k
        if top_k is not None and top_k in (-1, 0):  # vLLM's spelling of "no top-k"
            top_k = None
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=top_k, seed=self.seed, max_tokens=max_tokens, stop=self.stop or (),
                stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
                logprobs=logprobs)
        except ValueError as e:
            raise ApiError(400, str(e), _param_of(str(e))) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _param_of(message: str) -> str | None:
    """The field a SamplingParams message names (it starts with the name)."""
    name = message.split(" ", 1)[0]
    return {"max_new_tokens": "max_tokens"}.get(name, name) if name.isidentifier() else None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise ApiError(400, "echo=true is not supported", "echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise ApiError(400, f"best_of={self.best_of} is not supported (only 1)", "best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs must be an int in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt field as a list of prompts (text or token ids)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty: give a string, token ids, or a list of either", "prompt")
        if isinstance(prompt[0], int):  # validated as one of the union's lists: the first item tells which
            return [list(prompt)]
        return list(prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            kinds = sorted({p.type for p in content if p.type != "text"})
            if kinds:
                raise ApiError(400, f"message content of type {kinds} is not supported (text only)", "messages")
            content = "".join(p.text or "" for p in content)
        message = {"role": self.role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None
    response_format: dict | None = None
    # vLLM's extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise ApiError(400, "tools are not supported", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ApiError(400, f"response_format {self.response_format.get('type')!r} is not supported (text only)",
                           "response_format")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise ApiError(400, f"top_logprobs must be an int in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                               "top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens name the same limit: give one",
                           "max_completion_tokens")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

