"""Request and response shapes of the agent's HTTP API (OpenAI-compatible), as pydantic v2 models.

This module owns what the API accepts and returns. Request models validate bodies strictly (no
string-to-number coercion, no unknown keys, finite numbers only) so a wrong type is a 400 naming
the field; :func:`unsupported_parameter` then refuses OpenAI parameters that are well-formed but
would change the result in ways this server does not implement (``tools``, ``logprobs``,
``n > 1``, ...), while harmless ones (``user``, zero penalties, ``response_format: text``) pass.
Response models document the bodies the handlers build (and feed ``/openapi.json``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Completion",
    "CompletionChunk",
    "CompletionRequest",
    "DrainRequest",
    "DrainStatus",
    "ErrorResponse",
    "HealthStatus",
    "ModelCard",
    "ModelList",
    "Usage",
    "UsageReport",
    "unsupported_parameter",
]

MAX_STOP_SEQUENCES = 16
MAX_SEED = 2**63 - 1


# Schema-only constraints (``json_schema_extra``): they document what the server supports so
# generated clients and fuzzers stay within it, while validation stays permissive enough for
# unsupported_parameter() to explain the refusal ("only n=1 is supported").
_ONLY_1: JsonDict = {"maximum": 1}
_ONLY_0: JsonDict = {"enum": [0, None]}
_FALSE: JsonDict = {"const": False}
_EMPTY_LIST: JsonDict = {"maxItems": 0}
_NONE_CHOICE: JsonDict = {"enum": ["none", None]}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Requests


class TextContentPart(_Request):
    """A text part of a message's content (other part types, e.g. images, are not supported)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message of the conversation."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[Any] | None = Field(
        default=None, description="Not supported (must be empty).", json_schema_extra=_EMPTY_LIST
    )
    refusal: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = Field(
        json_schema_extra={"enum": ["text"], "description": "Only 'text' is supported."}
    )
    json_schema: dict[str, Any] | None = None


StopParam = Annotated[
    str
    | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)],
    Field(description="Text that ends generation (not included in the output)."),
]


class _SamplingFields(_Request):
    """Parameters chat and text completions share."""

    model: str = Field(min_length=1, description="Model id, as listed by GET /v1/models.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 is greedy.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(
        default=None, ge=-1, description="Extension: sample among the k most likely (0/-1: off)."
    )
    stop: StopParam | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None,
        description="Token id (as a string) -> bias in [-100, 100].",
        json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}},
    )
    n: int | None = Field(
        default=None, ge=1, le=128, description="Only 1 is supported.", json_schema_extra=_ONLY_1
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False, description="Extension: keep going past EOS.")
    presence_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="Only 0 is supported.", json_schema_extra=_ONLY_0
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="Only 0 is supported.", json_schema_extra=_ONLY_0
    )
    user: str | None = Field(default=None, max_length=512)
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    store: bool | None = None


class ChatCompletionRequest(_SamplingFields):
    """Body of POST /v1/chat/completions."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "smollm2-135m",
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": 4,
                }
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Same as max_tokens (the newer name)."
    )
    logprobs: bool | None = Field(
        default=None,
        description="Not supported (must be false).",
        json_schema_extra={"enum": [False, None]},
    )
    top_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="Not supported.", json_schema_extra=_ONLY_0
    )
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = Field(
        default=None, description="Not supported.", json_schema_extra=_EMPTY_LIST
    )
    tool_choice: Any = Field(
        default=None, description="Only 'none' is supported.", json_schema_extra=_NONE_CHOICE
    )
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = Field(
        default=None, description="Not supported.", json_schema_extra=_EMPTY_LIST
    )
    function_call: Any = Field(
        default=None, description="Only 'none' is supported.", json_schema_extra=_NONE_CHOICE
    )
    modalities: list[str] | None = Field(
        default=None, json_schema_extra={"anyOf": [{"const": ["text"]}, {"type": "null"}]}
    )
    reasoning_effort: str | None = Field(
        default=None, description="Not supported.", json_schema_extra={"anyOf": [{"type": "null"}]}
    )


# Lists hold one prompt; the schema says so, the handler explains it ("only one prompt...").
_ONE_ITEM: JsonDict = {"minItems": 1, "maxItems": 1}
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PromptParam = Annotated[
    Annotated[str, Field(json_schema_extra={"minLength": 1})]
    | Annotated[list[str], Field(json_schema_extra=_ONE_ITEM)]
    | TokenIds
    | Annotated[list[TokenIds], Field(json_schema_extra=_ONE_ITEM)],
    Field(description="Text or token ids; a list holds one prompt (batches are not supported)."),
]


class CompletionRequest(_SamplingFields):
    """Body of POST /v1/completions."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "smollm2-135m", "prompt": "Once upon a", "max_tokens": 4}]
        }
    )

    prompt: PromptParam
    echo: bool = Field(
        default=False, description="Not supported (must be false).", json_schema_extra=_FALSE
    )
    best_of: int | None = Field(
        default=None, ge=1, le=20, description="Only 1 is supported.", json_schema_extra=_ONLY_1
    )
    logprobs: int | None = Field(
        default=None, ge=0, le=5, description="Not supported.", json_schema_extra=_ONLY_0
    )
    suffix: str | None = Field(
        default=None, description="Not supported.", json_schema_extra={"maxLength": 0}
    )


class DrainRequest(_Request):
    """Body of POST /admin/drain (optional)."""

    deadline_s: float | None = Field(
        default=None, ge=0, le=86_400, description="Overrides the node's drain_timeout_s."
    )


def unsupported_parameter(
    body: ChatCompletionRequest | CompletionRequest,
) -> tuple[str, str] | None:
    """``(param, message)`` for the first parameter whose value this server cannot honour."""

    def nonzero(value: float | None) -> bool:
        return value is not None and value != 0

    if body.n is not None and body.n != 1:
        return "n", "only n=1 is supported"
    if nonzero(body.presence_penalty):
        return "presence_penalty", "only presence_penalty=0 is supported"
    if nonzero(body.frequency_penalty):
        return "frequency_penalty", "only frequency_penalty=0 is supported"
    if body.stream_options is not None and not body.stream:
        return "stream_options", "stream_options is only allowed when stream is true"
    if body.logit_bias:
        for key in body.logit_bias:
            if not key.isdigit():
                return "logit_bias", f"key {key!r} is not a token id"
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs:
            return "logprobs", "logprobs are not supported"
        if nonzero(body.top_logprobs):
            return "top_logprobs", "logprobs are not supported"
        if body.tools:
            return "tools", "tool calling is not supported"
        if body.functions:
            return "functions", "function calling is not supported"
        for name in ("tool_choice", "function_call"):
            value = getattr(body, name)
            if value is not None and value != "none":
                return name, f"{name} is not supported (only 'none')"
        if body.response_format is not None and body.response_format.type != "text":
            return "response_format", "only response_format type 'text' is supported"
        if body.modalities is not None and body.modalities != ["text"]:
            return "modalities", "only the 'text' modality is supported"
        if body.reasoning_effort is not None:
            return "reasoning_effort", "reasoning_effort is not supported"
        for i, message in enumerate(body.messages):
            if message.tool_calls:
                return f"messages[{i}].tool_calls", "tool calls are not supported"
    else:
        if body.echo:
            return "echo", "echo is not supported"
        if body.best_of is not None and body.best_of != 1:
            return "best_of", "only best_of=1 is supported"
        if body.logprobs:
            return "logprobs", "logprobs are not supported"
        if body.suffix:
            return "suffix", "suffix is not supported"
        prompt = body.prompt
        batched = isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list)
        if batched and len(prompt) != 1:
            return "prompt", "only one prompt per request is supported"
    return None


# --------------------------------------------------------------------------------------------
# Responses

FinishReason = Literal["stop", "length"]


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(_Response):
    """Response of a non-streaming chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streaming chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(_Response):
    """Response of a non-streaming text completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChunk(_Response):
    """One server-sent event of a streaming text completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    variant: str
    pool: str
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TenantQuotaState(_Response):
    requests_per_minute: float | None
    tokens_per_minute: float | None
    max_concurrency: int | None
    requests_available: float | None
    tokens_available: float | None
    in_flight: int


class UsageReport(_Response):
    """The calling tenant's usage on this node since the agent started."""

    object: Literal["usage"] = "usage"
    tenant: str
    node_id: str
    pool: str
    since: int = Field(description="Unix time the agent started counting.")
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    accelerator_seconds: float
    usd: float
    quota: TenantQuotaState


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class HealthStatus(_Response):
    status: Literal["ok", "ready", "loading", "draining", "failed"]
    detail: str | None = None


class DrainStatus(_Response):
    draining: bool
    deadline_s: float
    in_flight: int
