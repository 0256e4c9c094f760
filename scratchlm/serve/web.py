"""The web chat page and the feedback it collects: preference records for later fine-tuning.

`web_routes(feedback_path)` is a FastAPI router that `scratchlm serve` includes next to the
OpenAI-compatible API. It serves

- `GET /`: the chat page (`static/index.html`, `chat.js`, `chat.css`; no build step, no CDN),
  which streams replies from `POST /v1/chat/completions` and keeps the conversation;
- `POST /v1/feedback`: a thumbs up or down, or an edited answer, for one assistant reply. Each
  call appends one `PreferenceRecord` as one JSON line to `feedback_path`.

The file is a log, never rewritten: a second rating or a second edit of the same reply appends a
new record with the same `reply_id`, and a reader keeps the last record per `reply_id`
(`latest_per_reply`). An edit makes a preference pair for DPO (`chosen` = the edit, `rejected` =
the model's reply); a rating alone is the binary signal KTO trains on.

Appends are one `write` of one whole line to a file opened with O_APPEND, under a lock: the
kernel places each write at the end of the file, so lines from concurrent requests (or from
several server processes sharing the file) never interleave, and a server killed between two
records leaves whole lines only. A write cut short (a full disk) is reported, not ignored.
"""

import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from scratchlm.atomic_io import OutputFileError, check_writable_file, default_mode
from scratchlm.errors import InputFileError

# The page's own files: served by name from this table only, so no request path reaches the disk.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}
# Everything the page loads comes from this server; model output can never run as script even if
# a rendering bug let it into the DOM as markup.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

Text = Annotated[str, Field(max_length=1_000_000)]  # one record stays one sane line


class _Strict(BaseModel):
    # strict: "5" is not a number here; finite: NaN would make the JSONL line invalid JSON.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class SamplingSettings(_Strict):
    """The sampling settings the reply was generated with, under their OpenAI API names."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] | None = None


class FeedbackRequest(_Strict):
    """The body of `POST /v1/feedback`: one reply and what the user thought of it."""

    reply_id: Annotated[str, Field(min_length=1, max_length=200)] | None = None  # the completion's `id`
    model: Annotated[str, Field(min_length=1, max_length=500)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]  # the conversation before the reply
    completion: Text  # the reply as the model wrote it
    rating: Literal["up", "down"] | None = None
    edited: Annotated[str, Field(min_length=1, max_length=1_000_000)] | None = None
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)

    @field_validator("edited")
    @classmethod
    def _differs(cls, edited: str | None, info: ValidationInfo) -> str | None:
        if edited is not None and edited == info.data.get("completion"):
            raise ValueError("the edited reply is the same as the completion; send a rating alone instead")
        return edited

    @model_validator(mode="after")
    def _says_something(self) -> "FeedbackRequest":
        if self.rating is None and self.edited is None:
            raise ValueError("give a rating ('up' or 'down'), an edited reply, or both")
        return self


_LINE_BREAKS_BEYOND_NEWLINE = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class PreferenceRecord(BaseModel):
    """One line of the feedback file. `chosen`/`rejected` are present only when the user edited
    the reply (chosen = edited, rejected = the model's completion): a pair DPO can train on."""

    model_config = ConfigDict(extra="forbid")

    id: str
    created: int  # unix time, seconds
    reply_id: str | None
    model: str
    messages: list[ChatMessage]
    completion: str
    rating: Literal["up", "down"] | None
    edited: str | None
    chosen: str | None = None
    rejected: str | None = None
    sampling: dict[str, Any]

    @classmethod
    def from_feedback(cls, feedback: FeedbackRequest, now: float | None = None) -> "PreferenceRecord":
        return cls(
            id=f"fb-{uuid.uuid4().hex}",
            created=int(time.time() if now is None else now),
            reply_id=feedback.reply_id,
            model=feedback.model,
            messages=feedback.messages,
            completion=feedback.completion,
            rating=feedback.rating,
            edited=feedback.edited,
            chosen=feedback.edited,
            rejected=feedback.completion if feedback.edited is not None else None,
            sampling=feedback.sampling.model_dump(exclude_none=True),
        )

    def to_json_line(self) -> str:
        record = self.model_dump(mode="json")
        if self.edited is None:  # a pair exists only with an edit; absent, not null, otherwise
            del record["chosen"], record["rejected"]
        line = json.dumps(record, ensure_ascii=False)
        # Python's str.splitlines() and some editors also break lines at these three; JSON escapes
        # keep every record on one line for any reader.
        return line.translate(_LINE_BREAKS_BEYOND_NEWLINE) + "\n"


_append_lock = threading.Lock()


def append_feedback(path: str | Path, record: PreferenceRecord) -> Path:
    """Append `record` as one line to the JSONL file `path` (parent folders created); earlier
    lines are never touched."""
    target = check_writable_file(path)
    data = record.to_json_line().encode("utf-8")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _append_lock:
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, default_mode())
            try:
                written = os.write(fd, data)
            finally:
                os.close(fd)
    except OSError as exc:
        raise OutputFileError(f"{target}: cannot append feedback ({exc.strerror or exc})") from None
    if written != len(data):  # a full disk: the line is cut, and saying so beats a silent loss
        raise OutputFileError(f"{target}: only {written} of {len(data)} bytes of a feedback record written "
                              "(disk full?)")
    return target


def read_feedback(path: str | Path) -> list[PreferenceRecord]:
    """Every record of a feedback file, in the order written."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read feedback ({exc.strerror or exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(PreferenceRecord.model_validate_json(line))
        except ValidationError as exc:
            raise InputFileError(f"{path}:{number}: not a feedback record: {_first_error(exc)[0]}") from None
    return records


def latest_per_reply(records: Iterable[PreferenceRecord]) -> list[PreferenceRecord]:
    """The last record of each reply (records without a `reply_id` each stand alone), in the
    order the replies were first rated: what a fine-tuning set should hold."""
    latest: dict[str, PreferenceRecord] = {}
    for record in records:
        latest[record.reply_id or record.id] = record
    return list(latest.values())


# ---- HTTP ---------------------------------------------------------------------------------
def openai_error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None) -> JSONResponse:
    """An error in the body shape OpenAI's API and clients use."""
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": code}},
    )


def _first_error(exc: ValidationError) -> tuple[str, str | None]:
    """(message, param) of a validation error's first problem: `messages.1.role: Input should be ...`."""
    error = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in error["loc"]) or None
    message = error["msg"].removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def _static_files() -> dict[str, bytes]:
    folder = resources.files("scratchlm.serve").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC_FILES}


def web_routes(feedback_path: Path, api_key: str | None = None) -> APIRouter:
    """The chat page at `/` and `POST /v1/feedback`, which appends to `feedback_path`. With
    `api_key`, feedback needs `Authorization: Bearer <api_key>` like the rest of the API; the page
    itself stays open, since the key is typed into it."""
    feedback_path = check_writable_file(feedback_path)  # a bad path fails at start, not at the first click
    files = _static_files()  # read once: a few kB, and no disk access per request
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY,
               "X-Content-Type-Options": "nosniff"}
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def page() -> Response:
        return Response(files["index.html"], media_type=STATIC_FILES["index.html"], headers=headers)

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in files:
            return openai_error(404, f"no static file {name!r}", type_="not_found_error")
        return Response(files[name], media_type=STATIC_FILES[name], headers=headers)

    @router.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        # The body is validated here rather than by FastAPI so that errors keep OpenAI's shape and
        # status 400 whatever exception handlers the app installs.
        sent = request.headers.get("authorization", "").encode()
        if api_key is not None and not secrets.compare_digest(sent, f"Bearer {api_key}".encode()):
            return openai_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        try:
            request_body = FeedbackRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            message, param = _first_error(exc)
            return openai_error(400, message, param)
        record = PreferenceRecord.from_feedback(request_body)
        try:  # in a worker thread: a slow disk must not hold up the replies streaming meanwhile
            saved = await run_in_threadpool(append_feedback, feedback_path, record)
        except OutputFileError as exc:
            return openai_error(500, str(exc), type_="server_error")
        return JSONResponse({"id": record.id, "saved": str(saved)})

    return router
