"""The OpenAI-compatible HTTP API that `scratchlm serve` runs: `GET /v1/models`,
`POST /v1/completions` and `POST /v1/chat/completions` (whole replies or server-sent events),
`GET /health`, and the web chat page of `scratchlm.serve.web`. A classifier (a model folder of
kind "classifier") is served on `POST /v1/classify` instead, and the generation routes answer it
with a 400 saying so.

Every request becomes one `Generation` per choice on the app's one `Scheduler`, which batches the
generations of all concurrent requests into the same forward passes; nothing here runs the model.
A request is checked whole before anything is submitted, so bad input is a 400 with OpenAI's error
body and never reaches the model; a client that goes away cancels its generations, whose slots
the scheduler frees at its next step.

Requests and responses follow OpenAI's API reference field for field, so the official `openai`
client works unchanged; `top_k`, `min_p` and `repetition_penalty` are extensions (vLLM's names).

What one client can cost is bounded before any work: the body size (read no further than the
cap), the length of every list and name, the generations one request may queue, and the chat
template's render (`RenderLimits`). A server on a loopback address answers only to loopback host
names, which defeats DNS rebinding; uvicorn's connection, keep-alive and header limits are set by
`uvicorn_config`. docs/serving.md lists every limit.
"""

import asyncio
import contextlib
import ipaddress
import json
import logging
import reprlib
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send
from torch import nn

from scratchlm.errors import ConfigError, ContextTooLongError, ScratchLMError
from scratchlm.tokenizer.chat_template import (
    ChatTemplateError,
    ChatTemplateRefusal,
    ChatTooLongError,
    RenderLimits,
    chat_stop_ids,
    render_chat,
)
from scratchlm.serve.engine import Generation, Scheduler, ServerBusyError, TextEvent
from scratchlm.model.classifier import TextClassifier
from scratchlm.model.sampling import SamplingConfig, encode_prompt
from scratchlm.serve.web import DEFAULT_FEEDBACK_MAX_BYTES, MAX_MESSAGES, openai_error, web_routes
from scratchlm.tokenizer import Tokenizer

log = logging.getLogger("scratchlm.serve")

DEFAULT_MAX_TOKENS = 256  # when a request gives none: OpenAI's 16 cuts most chat replies short
MAX_N = 8  # choices per prompt (fewer when the queue is shorter: a request must fit in it)
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_CLASSIFY_INPUTS = 32  # texts in one /v1/classify request
MAX_STOP = 4  # stop strings, OpenAI's limit
MAX_CONTENT_PARTS = 256  # text parts in one message
MAX_NAME_CHARS = 256  # `model`, `user`, a message's `name`
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
DEFAULT_FEEDBACK_PATH = Path("feedback.jsonl")
# The request body cap, unless given: 1 MiB, or 32 bytes per token of context if that is more.
# A token of English is about 4 bytes of JSON, one of escaped CJK or emoji (\uXXXX) up to 12:
# a chat that fills the context fits with room to spare, and 100 clients sending the cap at once
# hold 100 MiB, not the gigabytes unbounded bodies reached.
MIN_DEFAULT_MAX_BODY = 2**20
BODY_BYTES_PER_TOKEN = 32
EXTRA_CONNECTIONS = 32  # beyond a full queue and batch: /health, the page, requests refused as busy
KEEP_ALIVE_S = 5  # an idle connection is closed after this (uvicorn's default, stated)
MAX_HEADER_BYTES = 16 * 1024  # request line and headers still incomplete (h11's default, stated)
LISTEN_BACKLOG = 2048  # connections the kernel holds before they are accepted (uvicorn's default)

Float = Annotated[float, Field(allow_inf_nan=False)]
ROLES = ("system", "developer", "user", "assistant")  # "developer": OpenAI's newer name for system

# OpenAI fields that clients send but this server cannot honour: refused by name, not as unknown
# fields, so a client learns the feature is missing rather than that it misspelled something.
UNSUPPORTED_FIELDS = frozenset({
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format",
    "logit_bias", "best_of", "audio", "modalities", "prediction", "reasoning_effort", "web_search_options",
    "service_tier", "store", "metadata",
})

# What a JSON value must be, by pydantic's error type: the wording a JSON client understands.
_WANTED_TYPE = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
                "string_type": "a string", "list_type": "a list", "model_type": "an object",
                "model_attributes_type": "an object", "dict_type": "an object"}

_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}

# SamplingConfig's names for the request fields they come from (the others are spelled alike).
_SAMPLING_FIELDS = {"max_new_tokens": "max_tokens", "num_samples": "n"}


# ---- errors --------------------------------------------------------------------------------
class APIError(Exception):
    """A request the API refuses, with the status and OpenAI error fields to answer it with."""

    def __init__(self, status: int, message: str, param: str | None = None, *, type_: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type_, self.code = status, message, param, type_, code

    def response(self) -> JSONResponse:
        response = openai_error(self.status, self.message, self.param, type_=self.type_, code=self.code)
        if self.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response


# Pydantic names the member of a union it tried (`stop.str`, `stop.list[str].0`): not a field.
_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _field_path(loc: Sequence[Any]) -> str | None:
    """A validation error's location the way the request spells it (`messages.0.content`),
    without FastAPI's `body` prefix or pydantic's union-member tags."""
    parts = [str(p) for p in loc
             if p != "body" and not (isinstance(p, str) and ("[" in p or p in _UNION_MEMBERS))]
    return ".".join(parts) or None


def _json_value(value: Any) -> str:
    """A parsed JSON value as a message shows it: short scalars as written, others by their type."""
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return f"the string {json.dumps(value)}" if len(value) <= 20 else "a string"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _plain_message(error: dict[str, Any]) -> str:
    kind, ctx = error.get("type", ""), error.get("ctx", {})
    if bound := _BOUNDS.get(kind):
        key, op = bound
        return f"must be {op} {ctx.get(key)}, not {_json_value(error.get('input'))}"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items, not {ctx.get('actual_length')}"
    if kind == "string_too_long":  # the value itself is not repeated: it may be megabytes
        return f"must be at most {ctx.get('max_length')} characters long"
    return error["msg"].removeprefix("Value error, ")


def _union_message(param: str, errors: Sequence[dict[str, Any]]) -> str:
    """What `param` must be, from its errors (one per union member that failed)."""
    if meant := [e for e in errors if e.get("type") not in _WANTED_TYPE]:
        # a member of the right JSON type that failed (a list too long) is what the client meant
        errors = meant
    wanted = dict.fromkeys(_WANTED_TYPE.get(e.get("type", ""), "") for e in errors)
    if "" not in wanted:  # only wrong JSON types: one sentence naming every accepted one
        return f"{param} must be {' or '.join(wanted)}, not {_json_value(errors[0].get('input'))}"
    messages = dict.fromkeys(_plain_message(e) for e in errors)
    if len(messages) == 1 and (only := next(iter(messages))).startswith("must "):
        return f"{param} {only}"
    return f"{param}: {' or '.join(messages)}"


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI answers 422; OpenAI's API and clients expect 400 with their error body.
    errors = exc.errors()
    first = errors[0]
    param = _field_path(first.get("loc", ()))
    # A union member that got further than the first failed one (a list whose item is wrong,
    # not a string) is what the client meant: report its error.
    deeper = [e for e in errors if param and (_field_path(e.get("loc", ())) or "").startswith(param + ".")]
    if deeper:
        first = deeper[0]
        param = _field_path(first.get("loc", ()))
    kind = first.get("type")
    body_form = "send a JSON object of the request's fields, with Content-Type: application/json"
    if kind == "json_invalid":
        message, param = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}", None
    elif kind == "extra_forbidden" and param in UNSUPPORTED_FIELDS:
        message = f"{param!r} is not supported by this server"
    elif kind == "extra_forbidden":
        message = f"unknown field {param!r}; see the API reference for the supported fields"
    elif kind == "missing" and param is None:  # FastAPI reads an empty body as a missing one
        message = f"the request body is empty; {body_form}"
    elif kind == "missing":
        message = f"{param} is required"
    elif param is None:
        message = f"the request body must be a JSON object, not {_json_value(first.get('input'))}; {body_form}"
    else:  # one error, or one per union member: say what every one of them wanted
        message = _union_message(param, [e for e in errors if _field_path(e.get("loc", ())) == param])
    return APIError(400, message, param).response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"unknown request URL: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    elif isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "There was an error parsing the body"
        bad = exc.__cause__
        message = (f"the request body is not UTF-8 (byte 0x{bad.object[bad.start]:02x} at offset {bad.start}); "
                   "send JSON encoded as UTF-8")
    elif isinstance(exc.__cause__, ValueError) and "integer string conversion" in str(exc.__cause__):
        message = f"the request body has an integer of more than {sys.get_int_max_str_digits()} digits"
    else:
        message = str(exc.detail)
    return APIError(exc.status_code, message, type_="invalid_request_error").response()


async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


def _request_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit:,} bytes "
                    "(scratchlm serve --max-body)", code="request_too_large")


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is a 413 as soon as its Content-Length
    or the bytes received so far pass the limit, so no more than `max_bytes` of it is ever held.
    A body within the limit reaches the app whole, as if it had just arrived."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _request_too_large(self.max_bytes).response()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its request: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _request_too_large(self.max_bytes).response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            # The body once, then the real channel: the app still hears the client disconnect.
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def is_loopback_host(host: str) -> bool:
    """Whether `host` (an address or a Host header's name, brackets and port removed) is this
    machine's loopback: `localhost` or a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _host_name(header: str) -> str:
    """The name of a Host header: `[::1]:8000` -> `::1`, `LocalHost:80` -> `localhost`."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0].lower() if header.count(":") == 1 else header.lower()


class LoopbackHosts:
    """ASGI middleware: a request that reached the server on a loopback address must name a
    loopback host (`localhost`, `127.0.0.1`, `[::1]`, any port) or one of `allowed_hosts`,
    else 421. This is what stops DNS rebinding: a page from evil.example whose name is made to
    resolve to 127.0.0.1 can reach a loopback server, but its requests say `Host: evil.example`.
    A request to a network address is left to the API key."""

    def __init__(self, app: Any, allowed_hosts: Sequence[str] = ()) -> None:
        self.app, self.allowed = app, frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] in ("http", "websocket") and server and is_loopback_host(str(server[0])):
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = _host_name(header)
            if header and not (is_loopback_host(name) or name in self.allowed):
                error = APIError(421, f"this server does not answer to the host {reprlib.repr(header)}: on a loopback "
                                 "address it answers only to localhost, 127.0.0.1 and [::1], which stops DNS "
                                 "rebinding; behind a proxy that passes its own host name, start it with "
                                 "--allowed-host NAME", code="host_not_allowed")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BearerAuth:
    """ASGI middleware: `/v1/` paths need `Authorization: Bearer <api_key>`. Checked before the
    body is read, so a client without the key learns nothing about its request but the 401."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and not self._authorized(scope):
            error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest: the time taken does not tell an attacker how much of a guess was right.
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key)


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: still answered in the shape clients parse. The traceback goes to the
    # log (uvicorn's); the client gets the exception's type only, as its text may name files.
    return APIError(500, f"internal server error ({type(exc).__name__}); the server's log has the details",
                    type_="server_error").response()


# ---- request bodies ------------------------------------------------------------------------
class _Request(BaseModel):
    # strict: JSON types as written, so "5" is not an integer and 1 not a boolean (a float field
    # still takes a JSON integer such as 1).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """The fields both endpoints share; ranges are OpenAI's (extensions: vLLM's)."""

    model: str = Field(max_length=MAX_NAME_CHARS)
    # None (JSON null) means the default, as in OpenAI's API: some clients send every field.
    max_tokens: int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2)  # default 1, OpenAI's
    top_p: Float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension; 0: off
    min_p: Float | None = Field(None, ge=0, le=1)  # extension
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    repetition_penalty: Float | None = Field(None, gt=0)  # extension; 1: off
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)  # accepted for compatibility; not used

    @model_validator(mode="before")
    @classmethod
    def _drop_null_unsupported(cls, body: Any) -> Any:
        # Clients that send every field send `"tools": null` and the like, which asks for nothing.
        if isinstance(body, dict):
            return {k: v for k, v in body.items() if not (k in UNSUPPORTED_FIELDS and v is None)}
        return body

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, not {len(stop)}")
        if stop == "" or (isinstance(stop, list) and "" in stop):
            raise ValueError("must not be an empty string: an empty stop string would end every completion at once")
        return stop

    @property
    def choices(self) -> int:
        return self.n or 1

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked by _completion_prompts
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)  # accepted for compatibility; templates do not use it
    # Present as null when a client sends back a reply it received; anything else is unsupported.
    refusal: None = None
    tool_calls: list | None = None

    @field_validator("role")
    @classmethod
    def _check_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"must be one of {', '.join(ROLES)}, not {role!r}")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, content: Any) -> Any:
        # Checked before the union so that an image part is named as such, not as "not a string".
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") != "text":
                    raise ValueError(f"only text content parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                     f"supported by this server, not {part.get('type')!r}")
        return content

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, calls: list | None) -> list | None:
        if calls:
            raise ValueError("tool calls are not supported by this server")
        return calls

    def as_template_message(self) -> dict[str, Any]:
        content = self.content if not isinstance(self.content, list) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ClassifyRequest(_Request):
    """POST /v1/classify: one text or a list of them as `input` (the shape of OpenAI's
    moderations and embeddings); `model`, when given, must name the served model."""

    model: str | None = Field(None, max_length=MAX_NAME_CHARS)
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_CLASSIFY_INPUTS)]


# ---- from a request to generations ------------------------------------------------------------
@dataclass
class _Prompt:
    ids: list[int]
    text: str  # what `echo` returns


@dataclass
class _Choice:
    """What one generation has produced so far."""

    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served!r} (GET /v1/models)",
                       "model", code="model_not_found")


def _unsupported(value: Any, name: str, what: str) -> None:
    if value not in (None, False):
        raise APIError(400, f"{name} is not supported by this server ({what})", name)


def _check_length(text: str, served: "_Served", param: str) -> None:
    """Refuse a text that cannot fit the context before the tokenizer spends seconds on it."""
    if len(text) > served.max_text_chars:
        raise APIError(400, f"the {param} has {len(text):,} characters, more than this model's context of "
                       f"{served.context} tokens can hold; shorten it", param)


def _check_samples(n: int, served: "_Served", prompts: int = 1) -> None:
    """A request whose generations could never all be queued at once is a 400, not a 503 that
    retrying cannot cure."""
    if n > served.max_samples:
        raise APIError(400, f"n must be at most {served.max_samples} on this server, not {n}", "n")
    if n * prompts > served.max_queue:
        raise APIError(400, f"this request asks for {n * prompts} generations ({prompts} prompts x n={n}); this "
                       f"server queues at most {served.max_queue} at once", "n")


def _completion_prompts(request: CompletionRequest, served: "_Served") -> list[_Prompt]:
    """The prompts of a completion request: a string, a list of strings, a list of token ids or a
    list of lists of token ids, as OpenAI's API accepts them."""
    prompt = request.prompt
    shape = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        items = prompt
    elif isinstance(prompt, list) and not prompt:
        raise APIError(400, "prompt is an empty list; give at least one prompt", "prompt")
    else:
        raise APIError(400, shape, "prompt")
    if len(items) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts in one request, not {len(items)}", "prompt")
    _check_samples(request.choices, served, len(items))
    for item in items:  # all checked before any is encoded or decoded
        _check_prompt(item, served, shape)
    tokenizer = served.tokenizer
    prompts = []
    for item in items:
        if isinstance(item, list):
            prompts.append(_Prompt(list(item), tokenizer.decode(item)))
            continue
        try:
            prompts.append(_Prompt(encode_prompt(tokenizer, item), item))
        except ConfigError as exc:  # an empty prompt and no <|endoftext|> to start from
            raise APIError(400, str(exc), "prompt") from None
    return prompts


def _check_prompt(item: str | list, served: "_Served", shape: str) -> None:
    """The cheap checks of one prompt, so that a million characters or token ids are refused
    before the tokenizer touches them."""
    if isinstance(item, str):
        _check_length(item, served, "prompt")
        return
    if not item or not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
        raise APIError(400, shape, "prompt")
    if len(item) > served.context:
        raise APIError(400, f"prompt has {len(item):,} tokens, more than this model's context of "
                       f"{served.context} tokens", "prompt")
    if (bad := next((t for t in item if not 0 <= t < served.tokenizer.vocab_size), None)) is not None:
        raise APIError(400, f"prompt has token id {bad}, outside this model's vocabulary (0 to "
                       f"{served.tokenizer.vocab_size - 1})", "prompt")


def _max_new_tokens(asked: int | None, prompt_tokens: int, context: int, param: str, what: str,
                    asked_param: str = "max_tokens") -> int:
    """The completion's token budget. Like OpenAI and vLLM, a prompt plus `max_tokens` that do not
    fit in the context is refused rather than silently cut. The error names `asked_param` when the
    prompt alone fits (the tokens asked for are at fault), else the prompt's field `param`."""
    if asked is None:
        if prompt_tokens >= context:
            raise APIError(400, f"this model's maximum context length is {context} tokens, and the {what} "
                           f"alone take {prompt_tokens}; shorten the {what}", param)
        return min(DEFAULT_MAX_TOKENS, context - prompt_tokens)
    if prompt_tokens + asked > context:
        raise APIError(400, f"this model's maximum context length is {context} tokens, but {prompt_tokens + asked} "
                       f"were requested ({prompt_tokens} in the {what}, {asked} for the completion); shorten the "
                       f"{what} or lower {asked_param}", param if prompt_tokens >= context else asked_param)
    return asked


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _sampling_error(exc: ConfigError, max_tokens_param: str) -> APIError:
    """SamplingConfig's "sampling: <field> must ..." as a 400 naming the request's field, without
    the internal prefix."""
    message = str(exc).removeprefix("sampling: ")
    name = message.split(" ", 1)[0]
    param = max_tokens_param if name == "max_new_tokens" else _SAMPLING_FIELDS.get(name, name)
    if param not in SamplingFields.model_fields and param != max_tokens_param:
        return APIError(400, message)
    return APIError(400, param + message.removeprefix(name), param)


def _sampling_configs(request: SamplingFields, max_new_tokens: int, stop_token_ids: tuple[int, ...],
                      max_tokens_param: str = "max_tokens") -> list[SamplingConfig]:
    """One config per choice: `n` choices of a seeded request use seeds seed, seed+1, ... so that
    they differ from each other and the request is reproducible."""
    try:
        return [
            SamplingConfig(
                temperature=_or(request.temperature, 1.0), top_k=request.top_k, top_p=_or(request.top_p, 1.0),
                min_p=_or(request.min_p, 0.0), repetition_penalty=_or(request.repetition_penalty, 1.0),
                frequency_penalty=_or(request.frequency_penalty, 0.0),
                presence_penalty=_or(request.presence_penalty, 0.0), max_new_tokens=max_new_tokens,
                stop=request.stop_strings(), stop_token_ids=stop_token_ids,
                seed=None if request.seed is None else request.seed + i,
            )
            for i in range(request.choices)
        ]
    except ConfigError as exc:
        raise _sampling_error(exc, max_tokens_param) from None


def _submit(scheduler: Scheduler, jobs: Sequence[tuple[list[int], SamplingConfig]], param: str) -> list[Generation]:
    """Queue every generation of a request, or none: a request refused as busy leaves nothing
    behind in the queue."""
    try:
        return scheduler.submit_many(jobs, loop=asyncio.get_running_loop())
    except ServerBusyError as exc:
        raise APIError(503, f"the server is busy: {exc}", type_="server_error") from None
    except ContextTooLongError as exc:
        raise APIError(400, str(exc), param) from None
    except ScratchLMError as exc:
        raise APIError(400, str(exc)) from None


async def _events(generations: Sequence[Generation]) -> AsyncIterator[tuple[int, TextEvent]]:
    """(choice index, event) from all generations as they arrive, until each has finished."""
    queue: asyncio.Queue[tuple[int, TextEvent]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for event in generation:
                await queue.put((index, event))
        except Exception as exc:  # noqa: BLE001 - an engine bug must end the choice, not leave the request waiting
            await queue.put((index, TextEvent("", 0, "error", f"{type(exc).__name__}: {exc}")))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, event = await queue.get()
            if event.finish_reason is not None:
                running -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


class _ClientGone(Exception):
    pass


async def _collect(generations: Sequence[Generation], request: Request) -> list[_Choice]:
    """Every generation's whole text. Checks every DISCONNECT_POLL_S that the client is still
    there: nothing else notices that a client waiting for a whole reply has left."""
    choices = [_Choice() for _ in generations]

    async def drain() -> None:
        async for index, event in _events(generations):
            _apply(choices[index], event)

    task = asyncio.create_task(drain())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                raise _ClientGone
        task.result()
    finally:
        task.cancel()
    return choices


def _apply(choice: _Choice, event: TextEvent) -> None:
    choice.text.append(event.text)
    choice.completion_tokens = event.completion_tokens
    if event.finish_reason is not None:
        choice.finish_reason, choice.error = event.finish_reason, event.error


def _check_finished(choices: Sequence[_Choice]) -> None:
    for choice in choices:
        if choice.finish_reason == "error":
            raise APIError(500, f"generation failed: {choice.error}", type_="server_error")
        if choice.finish_reason == "cancelled":
            raise APIError(503, "the server is shutting down; the generation was cancelled", type_="server_error")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class _GenerationStream(StreamingResponse):
    """Server-sent events that cancel their generations however the response ends: finished,
    client gone (Starlette cancels the sending task) or server shutdown."""

    def __init__(self, content: AsyncIterator[str], generations: Sequence[Generation]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generations = generations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for generation in self.generations:
                generation.cancel()


async def _stream_chunks(
    generations: Sequence[Generation], chunk: Any, first: Sequence[str], include_usage: bool, prompt_tokens: int,
    usage_chunk: Any,
) -> AsyncIterator[str]:
    """The event stream of a request: `first` (opening chunks), a chunk per piece of text, a
    chunk with each choice's finish_reason, the usage chunk if asked, then [DONE]. `chunk(index,
    text, finish_reason)` builds one chunk in the endpoint's shape."""
    for event in first:
        yield event
    completion_tokens = [0] * len(generations)
    async for index, event in _events(generations):
        completion_tokens[index] = event.completion_tokens
        if event.finish_reason in ("error", "cancelled"):
            message = event.error if event.finish_reason == "error" else "the server is shutting down"
            yield _sse({"error": {"message": f"generation failed: {message}", "type": "server_error",
                                  "param": None, "code": None}})
            return
        if event.text:
            yield _sse(chunk(index, event.text, None))
        if event.finish_reason is not None:
            yield _sse(chunk(index, "", event.finish_reason))
    if include_usage:
        yield _sse(usage_chunk(_usage(prompt_tokens, sum(completion_tokens))))
    yield _sse("[DONE]")


# ---- the app -------------------------------------------------------------------------------
@dataclass
class _Served:
    model: nn.Module
    tokenizer: Tokenizer
    name: str
    created: int
    max_token_chars: int  # the most characters one token stands for
    max_queue: int
    scheduler: Scheduler | None = None
    classifier: TextClassifier | None = None  # set when a classifier is served (`model` is then its network)
    classifier_lock: threading.Lock = field(default_factory=threading.Lock)  # one forward pass at a time

    @property
    def context(self) -> int:
        return self.model.config.block_size

    @property
    def max_samples(self) -> int:
        """`n` at most: a request must fit in the queue, all its generations at once."""
        return min(MAX_N, self.max_queue)

    @property
    def max_text_chars(self) -> int:
        """No token stands for more than `max_token_chars` characters, so a longer text has
        more tokens than the context holds."""
        return self.context * self.max_token_chars

    def check_generates(self) -> None:
        """A 400 for a generation request to a classifier, before anything else is checked."""
        if self.classifier is not None:
            raise APIError(400, f"{self.name!r} is a classifier: it does not generate text; send its texts to "
                           "POST /v1/classify")

    def running_scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise APIError(503, "the server is not started (run the app with its lifespan)", type_="server_error")
        return self.scheduler


def check_limits(max_batch: int, max_queue: int, max_body: int | None, feedback_max_bytes: int) -> None:
    """A one-line ConfigError for a limit that leaves the server nothing to serve."""
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_body", max_body),
                        ("feedback_max_bytes", feedback_max_bytes)):
        if value is not None and value < 1:
            raise ConfigError(f"serve: {name} must be >= 1, not {value}")


def default_max_body(context: int) -> int:
    """The request body cap for a model with `context` positions (see MIN_DEFAULT_MAX_BODY)."""
    return max(MIN_DEFAULT_MAX_BODY, BODY_BYTES_PER_TOKEN * context)


def create_app(
    model: nn.Module | TextClassifier,
    tokenizer: Tokenizer,
    model_name: str,
    *,
    max_batch: int = 8,
    max_queue: int = 256,
    api_key: str | None = None,
    feedback_path: str | Path | None = None,
    max_body: int | None = None,
    allowed_hosts: Sequence[str] = (),
    feedback_max_bytes: int = DEFAULT_FEEDBACK_MAX_BYTES,
) -> FastAPI:
    """The API for `model` (a language model, or a classifier served on /v1/classify) under
    the name `model_name`. Its scheduler starts with the app's
    lifespan and stops with it (a `TestClient` must be used as a context manager). With
    `api_key`, every `/v1/` route needs `Authorization: Bearer <api_key>`; `/` and `/health` stay
    open. The web page's feedback goes to `feedback_path` (default: feedback.jsonl here), a file
    of at most `feedback_max_bytes`. Request bodies are capped at `max_body` bytes (default:
    `default_max_body` of the model's context). On a loopback address the server answers only
    to loopback host names and `allowed_hosts` (the names a reverse proxy passes)."""
    check_limits(max_batch, max_queue, max_body, feedback_max_bytes)
    if api_key is not None and not api_key:
        raise ConfigError("serve: the API key is empty; give a key or none")
    longest_token = max([*map(len, tokenizer.ranks), *map(len, tokenizer.special_tokens), 1])
    classifier = model if isinstance(model, TextClassifier) else None
    network = classifier.model if classifier is not None else model
    served = _Served(network, tokenizer, model_name, int(time.time()), longest_token, max_queue, classifier=classifier)
    body_limit = default_max_body(served.context) if max_body is None else max_body

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if classifier is not None:  # nothing to schedule: a classification is one forward pass
            yield
            return
        served.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
        try:
            yield
        finally:
            scheduler, served.scheduler = served.scheduler, None
            await run_in_threadpool(scheduler.close)

    app = FastAPI(title="scratchlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    # Added innermost first: the host is checked, then the key, and only then is the body read.
    app.add_middleware(BodyLimit, max_bytes=body_limit)
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(LoopbackHosts, allowed_hosts=allowed_hosts)
    app.state.served = served
    app.state.max_connections = max_queue + max_batch + EXTRA_CONNECTIONS
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected_error)

    @app.get("/health")
    def health() -> dict[str, Any]:
        scheduler = served.scheduler
        ready = scheduler is not None or classifier is not None
        return {"status": "ok" if ready else "starting", "model": served.name,
                "active": scheduler.active if scheduler else 0, "waiting": scheduler.waiting if scheduler else 0}

    def model_card() -> dict[str, Any]:
        card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "scratchlm",
                "max_model_len": served.context}
        if classifier is not None:
            card.update(kind="classifier", labels=list(classifier.labels))
        return card

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str) -> dict[str, Any]:
        _check_model(name, served.name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _complete(served, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _chat(served, body, request)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        return await run_in_threadpool(_classify, served, body)

    feedback = Path(feedback_path) if feedback_path is not None else DEFAULT_FEEDBACK_PATH
    # A record holds a chat request's conversation and the reply twice (as completion and as
    # rejected, or edited and chosen): twice the body cap.
    app.include_router(web_routes(feedback, max_record_bytes=2 * body_limit, max_file_bytes=feedback_max_bytes))
    return app


def _check_stream_options(body: SamplingFields) -> bool:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    return body.stream_options is not None and body.stream_options.include_usage


async def _complete(served: _Served, body: CompletionRequest, request: Request):
    served.check_generates()
    _check_model(body.model, served.name)
    _unsupported(body.logprobs, "logprobs", "token log-probabilities are not returned")
    _unsupported(body.suffix, "suffix", "no fill-in-the-middle")
    include_usage = _check_stream_options(body)
    prompts = await run_in_threadpool(_completion_prompts, body, served)
    jobs = []
    for prompt in prompts:
        max_new = _max_new_tokens(body.max_tokens, len(prompt.ids), served.context, "prompt", "prompt")
        jobs += [(prompt.ids, config) for config in _sampling_configs(body, max_new, ())]
    generations = _submit(served.running_scheduler(), jobs, "prompt")
    prompt_tokens = sum(len(p.ids) for p in prompts)
    echoes = [prompts[i // body.choices].text if body.echo else "" for i in range(len(jobs))]
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def envelope(choices: list[dict], usage: dict | None = None) -> dict:
        payload = {"id": response_id, "object": "text_completion", "created": created, "model": served.name,
                   "choices": choices}
        if usage is not None or not body.stream:
            payload["usage"] = usage
        return payload

    def choice(index: int, text: str, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    if body.stream:
        first = [_sse(envelope([choice(i, echo, None)])) for i, echo in enumerate(echoes) if echo]
        chunks = _stream_chunks(generations, lambda i, text, finish: envelope([choice(i, text, finish)]), first,
                                include_usage, prompt_tokens, lambda usage: envelope([], usage))
        return _GenerationStream(chunks, generations)
    try:
        results = await _collect(generations, request)
    except _ClientGone:
        return JSONResponse({}, status_code=499)  # nobody reads it; the generations are cancelled
    finally:
        for generation in generations:
            generation.cancel()
    _check_finished(results)
    completion_tokens = sum(r.completion_tokens for r in results)
    return envelope([choice(i, echo + "".join(r.text), r.finish_reason) for i, (echo, r) in enumerate(zip(echoes, results))],
                    _usage(prompt_tokens, completion_tokens))


def _chat_prompt(served: "_Served", messages: list[ChatMessage]) -> list[int]:
    # The render may make no more text than the context could hold (see `max_text_chars`).
    limits = RenderLimits(max_chars=served.max_text_chars)
    try:
        text = render_chat(served.tokenizer, [m.as_template_message() for m in messages], limits=limits)
    except ChatTooLongError:
        raise APIError(400, f"the messages render to more than {limits.max_chars:,} characters, more than this "
                       f"model's context of {served.context} tokens can hold; shorten them", "messages") from None
    except ChatTemplateRefusal as exc:  # the template's own check of the conversation
        raise APIError(400, str(exc), "messages") from None
    except ChatTemplateError as exc:  # broken or runaway: the served model's fault, not the request's
        log.error("%s", exc)
        raise APIError(500, f"{exc} (a fault of the served model's template, which the server's operator must fix)",
                       type_="server_error") from None
    except ConfigError as exc:  # no template at all, or messages it cannot take
        raise APIError(400, str(exc), "messages") from None
    return served.tokenizer.encode(text, allowed_special="all")


async def _chat(served: _Served, body: ChatCompletionRequest, request: Request):
    served.check_generates()
    _check_model(body.model, served.name)
    _unsupported(body.logprobs, "logprobs", "token log-probabilities are not returned")
    _unsupported(body.top_logprobs, "top_logprobs", "token log-probabilities are not returned")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    include_usage = _check_stream_options(body)
    _check_samples(body.choices, served)
    prompt_ids = await run_in_threadpool(_chat_prompt, served, body.messages)
    asked_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_new = _max_new_tokens(asked, len(prompt_ids), served.context, "messages", "messages", asked_param)
    configs = _sampling_configs(body, max_new, chat_stop_ids(served.tokenizer), asked_param)
    generations = _submit(served.running_scheduler(), [(prompt_ids, c) for c in configs], "messages")
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def envelope(obj: str, choices: list[dict], usage: dict | None = None) -> dict:
        payload = {"id": response_id, "object": obj, "created": created, "model": served.name, "choices": choices}
        if usage is not None or obj == "chat.completion":
            payload["usage"] = usage
        return payload

    if body.stream:
        def delta(index: int, text: str, finish_reason: str | None) -> dict:
            content = {"content": text} if finish_reason is None else {}
            return envelope("chat.completion.chunk",
                            [{"index": index, "delta": content, "logprobs": None, "finish_reason": finish_reason}])

        first = [_sse(envelope("chat.completion.chunk", [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                           "logprobs": None, "finish_reason": None}]))
                 for i in range(len(generations))]
        chunks = _stream_chunks(generations, delta, first, include_usage, len(prompt_ids),
                                lambda usage: envelope("chat.completion.chunk", [], usage))
        return _GenerationStream(chunks, generations)
    try:
        results = await _collect(generations, request)
    except _ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        for generation in generations:
            generation.cancel()
    _check_finished(results)
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(r.text)}, "logprobs": None,
                "finish_reason": r.finish_reason} for i, r in enumerate(results)]
    return envelope("chat.completion", choices, _usage(len(prompt_ids), sum(r.completion_tokens for r in results)))


def _classify(served: _Served, body: ClassifyRequest) -> dict[str, Any]:
    """Each input's label and the probability of every label (one forward pass per call, as
    many run at once as the lock lets: the model is shared)."""
    classifier = served.classifier
    if classifier is None:
        raise APIError(400, f"{served.name!r} is a language model; /v1/classify needs a classifier (a model "
                       "folder of kind \"classifier\", which `scratchlm finetune classify` writes)", "model")
    if body.model is not None:
        _check_model(body.model, served.name)
    texts = [body.input] if isinstance(body.input, str) else body.input
    try:
        ids = classifier.encode(texts)
    except ConfigError as exc:  # an empty text and no end token to read it by
        raise APIError(400, f"input: {exc}", "input") from None
    with served.classifier_lock:
        probabilities = classifier.probabilities_of(ids)
    results = [{"object": "classification", "index": i, "label": max(probs, key=probs.__getitem__), "probabilities": probs}
               for i, probs in enumerate(probabilities)]
    tokens = sum(map(len, ids))
    return {"id": f"clf-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": served.name,
            "data": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# ---- running it ----------------------------------------------------------------------------
def listen_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: any free port), or a one-line ConfigError: a port in
    use is found before the model is loaded, and the real port of port 0 is known. It listens at
    once, so a client that connects as soon as the URL is printed waits in the kernel's backlog
    until uvicorn accepts, instead of being refused."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"serve: cannot listen on {host}:{port}: {reason}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_config(app: FastAPI, log_level: str = "info") -> uvicorn.Config:
    """How uvicorn runs an app of `create_app`: at most a full queue and batch of connections (and
    EXTRA_CONNECTIONS more; past that uvicorn answers 503), idle connections closed after
    KEEP_ALIVE_S, request lines and headers of at most MAX_HEADER_BYTES. h11 is named because that
    header limit is its own. Uvicorn has no timeout for a client that sends its request slowly:
    in front of a public server, a reverse proxy must (docs/serving.md)."""
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, http="h11",
                          limit_concurrency=getattr(app.state, "max_connections", None),
                          timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES)


class ServerThread:
    """`app` served by uvicorn on a background thread, for tests and benchmarks:
    `with ServerThread(app) as server: openai.OpenAI(base_url=server.url + "/v1", ...)`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = listen_socket(host, port)
        self.url = _url(self.sock)
        self.server = uvicorn.Server(uvicorn_config(app, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the uvicorn server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def run_server(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_batch: int = 8,
    max_queue: int = 256,
    api_key: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    quantize: str = "none",
    group_size: int = 64,
    feedback_path: str | Path | None = None,
    model_name: str | None = None,
    log_level: str = "info",
    max_body: int | None = None,
    allowed_hosts: Sequence[str] = (),
    feedback_max_bytes: int = DEFAULT_FEEDBACK_MAX_BYTES,
) -> None:
    """Load the model at `model_path` (in `dtype`, `quantize`d: see `scratchlm.model.quantize`)
    and serve it until Ctrl-C (or SIGTERM). Prints the URL. The limits are `create_app`'s."""
    from scratchlm.interop import detect_model, open_model
    from scratchlm.serve.load import load_for_inference

    check_limits(max_batch, max_queue, max_body, feedback_max_bytes)  # before the seconds a model takes to load
    classifier = detect_model(model_path).kind == "classifier"
    if classifier and (dtype, quantize) != ("float32", "none"):
        raise ConfigError(f"serve: {model_path} is a classifier, served in float32; leave out --dtype and --quantize")
    sock = listen_socket(host, port)
    try:
        if classifier:
            opened = open_model(model_path, device)
            model, tokenizer = opened.model, opened.tokenizer
        else:
            model, tokenizer = load_for_inference(model_path, device, dtype, quantize, group_size)
        path = Path(model_path)
        name = model_name or (path.stem if path.is_file() else path.resolve().name)
        app = create_app(model, tokenizer, name, max_batch=max_batch, max_queue=max_queue, api_key=api_key,
                         feedback_path=feedback_path, max_body=max_body, allowed_hosts=allowed_hosts,
                         feedback_max_bytes=feedback_max_bytes)
        url = _url(sock)
        routes = f"{url}/v1/classify (classifier)" if classifier else f"{url}/v1 (OpenAI API) and {url}/ (chat page)"
        print(f"serving {name} at {routes}; Ctrl-C stops", flush=True)
        if api_key is None and not is_loopback_host(host):
            print(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the "
                  "model", file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn_config(app, log_level))
        server.run(sockets=[sock])
    finally:
        sock.close()

