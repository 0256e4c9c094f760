"""The web chat page and the feedback it collects: preference records for later fine-tuning.

`web_routes(feedback_path)` is a FastAPI router that `scratchlm serve` includes next to the
OpenAI-compatible API. It serves

- `GET /`: the chat page (`static/index.html`, `chat.js`, `chat.css`; no build step, no CDN),
  which streams replies from `POST /v1/chat/completions` and keeps the conversation;
- `POST /v1/feedback`: a thumbs up or down, or an edited answer, for one assistant reply. Each
  call appends one `PreferenceRecord` as one JSON line to `feedback_path`.

Feedback writes to the server's disk, so only the page itself may send it: the body must be
`application/json` (a cross-site form or `text/plain` fetch cannot send that without the
browser asking the server first, which it never allows), and a request the browser marks as
cross-site (`Sec-Fetch-Site`, else an `Origin` that is not this host) is refused. A record and
the file have size caps; the file is created readable by its owner only, and no response
names its path.

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
import logging
import os
import reprlib
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

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

from scratchlm.atomic_io import OutputFileError, check_writable_file
from scratchlm.data import feedback_records
from scratchlm.errors import InputFileError
from scratchlm.model.sampling import MAX_STOP_LENGTH, MAX_STOP_STRINGS

log = logging.getLogger("scratchlm.serve")

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
MAX_MESSAGES = 1024  # in one conversation: far more turns than any context holds
DEFAULT_MAX_RECORD_BYTES = 2 * 2**20  # one line of the feedback file
DEFAULT_FEEDBACK_MAX_BYTES = 256 * 2**20  # the whole file: thousands of long conversations
FEEDBACK_FILE_MODE = 0o600  # preference data may be private: readable by the server's user only


class FeedbackFileFullError(OutputFileError):
    """The feedback file has reached its size cap."""


class FeedbackRecordTooLargeError(OutputFileError):
    """One feedback record is over the size a server takes."""


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
    stop: Annotated[list[Annotated[str, Field(max_length=MAX_STOP_LENGTH)]],
                    Field(max_length=MAX_STOP_STRINGS)] | None = None


class FeedbackRequest(_Strict):
    """The body of `POST /v1/feedback`: one reply and what the user thought of it."""

    reply_id: Annotated[str, Field(min_length=1, max_length=200)] | None = None  # the completion's `id`
    model: Annotated[str, Field(min_length=1, max_length=500)]
    # the conversation before the reply
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
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


def append_feedback(path: str | Path, record: PreferenceRecord, max_file_bytes: int = DEFAULT_FEEDBACK_MAX_BYTES,
                    max_record_bytes: int | None = None) -> Path:
    """Append `record` as one line to the JSONL file `path` (parent folders created); earlier
    lines are never touched. A new file is created readable by its owner only. A record over
    `max_record_bytes` is refused (FeedbackRecordTooLargeError), and so is one that would take
    the file past `max_file_bytes` (FeedbackFileFullError)."""
    target = check_writable_file(path)
    data = record.to_json_line().encode("utf-8")
    if max_record_bytes is not None and len(data) > max_record_bytes:
        raise FeedbackRecordTooLargeError(f"the feedback record would be {len(data):,} bytes; this server takes at "
                                          f"most {max_record_bytes:,}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _append_lock:
            # The mode at creation, not a chmod after: no moment when others could open it.
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FEEDBACK_FILE_MODE)
            try:
                size = os.fstat(fd).st_size
                if size + len(data) > max_file_bytes:
                    raise FeedbackFileFullError(f"{target}: the feedback file is full ({size:,} bytes; the cap is "
                                                f"{max_file_bytes:,}); move it away to collect more")
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
    latest, _ = feedback_records.latest_per_reply(records, lambda r: feedback_records.reply_key(r.reply_id, r.id, ""))
    return latest


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


def _is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


def cross_site_reason(headers: Mapping[str, str]) -> str | None:
    """Why a request's headers show it was sent by a page of another site, or None. Browsers
    send `Sec-Fetch-Site` with every request (same-origin for the chat page's own fetch); older
    ones send `Origin`, which must then name this host. Clients that are not browsers send
    neither, and are the API key's business."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None:
        return None if fetch_site in ("same-origin", "none") else f"Sec-Fetch-Site is {reprlib.repr(fetch_site)}"
    origin = headers.get("origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != headers.get("host", "").lower()):
        return f"Origin {reprlib.repr(origin)} is not this server"
    return None


def web_routes(feedback_path: Path, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
               max_file_bytes: int = DEFAULT_FEEDBACK_MAX_BYTES) -> APIRouter:
    """The chat page at `/` and `POST /v1/feedback`, which appends to `feedback_path` records of
    at most `max_record_bytes`, up to a file of `max_file_bytes`. The server's API key, when it has
    one, guards feedback like every `/v1/` path (`server.BearerAuth`); the page itself stays open,
    since the key is typed into it."""
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
        if reason := cross_site_reason(request.headers):
            return openai_error(403, f"feedback is taken from this server's own chat page only; {reason}",
                                code="cross_site_request")
        if not _is_json(request.headers.get("content-type", "")):
            return openai_error(415, "send feedback as JSON, with Content-Type: application/json",
                                code="unsupported_media_type")
        try:
            request_body = FeedbackRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            message, param = _first_error(exc)
            return openai_error(400, message, param)
        record = PreferenceRecord.from_feedback(request_body)
        # The file's path stays in the server's log: a client has no business knowing it.
        try:  # in a worker thread: encoding a big record or a slow disk must not hold up the replies streaming
            await run_in_threadpool(append_feedback, feedback_path, record, max_file_bytes, max_record_bytes)
        except FeedbackRecordTooLargeError as exc:
            return openai_error(413, str(exc), code="request_too_large")
        except FeedbackFileFullError as exc:
            log.error("%s", exc)
            return openai_error(507, f"the server's feedback file is full (at its cap of {max_file_bytes:,} bytes); "
                                "the server's operator must move it away", type_="server_error",
                                code="feedback_file_full")
        except OutputFileError as exc:
            log.error("%s", exc)
            return openai_error(500, "the server cannot save feedback: its feedback file is not writable (the "
                                "server's log says why)", type_="server_error")
        return JSONResponse({"id": record.id})

    return router
