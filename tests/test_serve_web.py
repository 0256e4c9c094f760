"""The web chat page and its feedback records.

Unit tests drive `web_routes` through FastAPI's TestClient. The browser test starts the real
server (`create_app`) with a tiny model and drives Debian's Chromium with Playwright: type a
message, watch the reply stream in, rate it, edit it, and find the records on disk.
"""

import importlib.util
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from scratchlm.atomic_io import OutputFileError
from scratchlm.model import GPT, get_preset
from scratchlm.tokenizer.chat_template import chat_stop_ids
from scratchlm.serve.engine import Generation
from scratchlm.serve.web import (
    FEEDBACK_FILE_MODE,
    FeedbackFileFullError,
    FeedbackRequest,
    PreferenceRecord,
    append_feedback,
    latest_per_reply,
    read_feedback,
    web_routes,
)
from scratchlm.tokenizer import train_bpe
from serve_helpers import submitted_generations, wait_until

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime."},
]


def feedback_body(**changes) -> dict:
    body = {
        "reply_id": "chatcmpl-1",
        "model": "tiny",
        "messages": CONVERSATION,
        "completion": "Nine.",
        "rating": "down",
        "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 64},
    }
    return {**body, **changes}


def client_for(feedback_path: Path, **kwargs) -> TestClient:
    app = FastAPI()
    app.include_router(web_routes(feedback_path, **kwargs))
    return TestClient(app)


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- the page ------------------------------------------------------------------------------
def test_root_serves_the_chat_page_with_its_controls(tmp_path):
    client = client_for(tmp_path / "fb.jsonl")
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for control in ["system-prompt", "temperature", "top-p", "top-k", "max-tokens", "api-key", "new-chat",
                    "message-input", "send", "messages", "error"]:
        assert f'data-testid="{control}"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # No CDN, no inline code: everything the page loads is ours.
    assert "http://" not in page.text and "https://" not in page.text
    for asset, kind in [("/static/chat.js", "text/javascript"), ("/static/chat.css", "text/css")]:
        assert f'"{asset}"' in page.text
        response = client.get(asset)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert len(response.content) > 1000


def test_static_serves_only_the_pages_own_files(tmp_path):
    client = client_for(tmp_path / "fb.jsonl")
    for name in ["web.py", "..%2Fweb.py", "nothing.js"]:
        response = client.get(f"/static/{name}")
        assert response.status_code == 404, name
    assert client.get("/static/../web.py").status_code == 404


def test_page_script_sets_model_text_as_text_only():
    script = (Path(__file__).parents[1] / "scratchlm/serve/static/chat.js").read_text(encoding="utf-8")
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script


# ---- records -------------------------------------------------------------------------------
def test_rating_appends_one_record_without_a_pair(tmp_path):
    path = tmp_path / "fb.jsonl"
    before = int(time.time())
    response = client_for(path).post("/v1/feedback", json=feedback_body())
    after = time.time()
    assert response.status_code == 200
    (record,) = lines_of(path)
    assert response.json() == {"id": record["id"]}
    assert record["messages"] == CONVERSATION and record["completion"] == "Nine."
    assert record["rating"] == "down" and record["edited"] is None
    assert "chosen" not in record and "rejected" not in record
    assert record["model"] == "tiny" and record["reply_id"] == "chatcmpl-1"
    assert record["sampling"] == {"temperature": 0.7, "top_p": 0.95, "max_tokens": 64}
    assert isinstance(record["created"], int) and before <= record["created"] <= after  # unix seconds, when it was made


def test_edit_makes_a_preference_pair_chosen_edit_rejected_original(tmp_path):
    path = tmp_path / "fb.jsonl"
    response = client_for(path).post("/v1/feedback", json=feedback_body(rating=None, edited="Seven."))
    assert response.status_code == 200
    (record,) = lines_of(path)
    assert record["rating"] is None and record["edited"] == "Seven."
    assert record["chosen"] == "Seven." and record["rejected"] == "Nine."


def test_second_feedback_on_a_reply_appends_and_the_latest_wins(tmp_path):
    path = tmp_path / "deep" / "folder" / "fb.jsonl"  # parent folders are created
    client = client_for(path)
    assert client.post("/v1/feedback", json=feedback_body(rating="up")).status_code == 200
    first_line = path.read_bytes()
    assert client.post("/v1/feedback", json=feedback_body(rating="down", edited="Seven.")).status_code == 200
    assert client.post("/v1/feedback", json=feedback_body(reply_id="chatcmpl-2", rating="up")).status_code == 200
    assert path.read_bytes().startswith(first_line)  # appended, never rewritten
    records = read_feedback(path)
    assert [r.rating for r in records] == ["up", "down", "up"]
    latest = latest_per_reply(records)
    assert [(r.reply_id, r.rating, r.chosen) for r in latest] == [
        ("chatcmpl-1", "down", "Seven."), ("chatcmpl-2", "up", None)]


def test_records_keep_unicode_and_newlines_on_one_line(tmp_path):
    path = tmp_path / "fb.jsonl"
    text = "Zeile 1\nZeile 2 — naïve 日本語 🙂\u2028line\x85separators\u2029end"
    assert client_for(path).post("/v1/feedback", json=feedback_body(completion=text)).status_code == 200
    raw = path.read_text(encoding="utf-8")
    assert len(raw.splitlines()) == 1 and raw.endswith("\n") and "日本語" in raw
    assert read_feedback(path)[0].completion == text


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "fb.jsonl"
    big = "x" * 200_000  # far above the pipe buffer size: interleaving would show
    record = PreferenceRecord.from_feedback(FeedbackRequest.model_validate(feedback_body(completion=big)))

    def writer() -> None:
        for _ in range(10):
            append_feedback(path, record)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = lines_of(path)
    assert len(records) == 40 and all(r["completion"] == big for r in records)


def test_feedback_file_keeps_existing_lines_and_permissions(tmp_path):
    path = tmp_path / "fb.jsonl"
    path.write_text('{"earlier": "line"}\n', encoding="utf-8")
    inode = path.stat().st_ino
    client_for(path).post("/v1/feedback", json=feedback_body())
    assert path.stat().st_ino == inode
    assert path.read_text(encoding="utf-8").startswith('{"earlier": "line"}\n{')


# ---- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (feedback_body(rating="meh"), "rating", "'up' or 'down'"),
        (feedback_body(rating=None), None, "give a rating"),
        (feedback_body(edited="Nine."), "edited", "same as the completion"),
        (feedback_body(edited=""), "edited", "at least 1 character"),
        (feedback_body(messages=[]), "messages", "at least 1 item"),
        (feedback_body(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role",
         "'system', 'user' or 'assistant'"),
        (feedback_body(messages=[{"role": "user", "content": 5}]), "messages.0.content", "valid string"),
        (feedback_body(messages=[{"role": "user", "content": "hi", "name": "x"}]), "messages.0.name", "Extra inputs"),
        (feedback_body(surprise=1), "surprise", "Extra inputs"),
        (feedback_body(sampling={"temperature": "hot"}), "sampling.temperature", "valid number"),
        (feedback_body(sampling={"top_k": 5.5}), "sampling.top_k", "valid integer"),
        (feedback_body(sampling={"warmth": 1}), "sampling.warmth", "Extra inputs"),
        (feedback_body(model=""), "model", "at least 1 character"),
        ({k: v for k, v in feedback_body().items() if k != "completion"}, "completion", "Field required"),
        ([1, 2], None, "object"),
    ],
)
def test_bad_feedback_is_a_400_with_an_openai_error_body(tmp_path, body, param, words):
    path = tmp_path / "fb.jsonl"
    response = client_for(path).post("/v1/feedback", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert error["param"] == param and words in error["message"]
    assert not path.exists()


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b'{"temperature": NaN}'])
def test_feedback_that_is_not_json_is_a_400(tmp_path, raw):
    client = client_for(tmp_path / "fb.jsonl")
    response = client.post("/v1/feedback", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_infinite_sampling_values_are_refused(tmp_path):
    raw = json.dumps(feedback_body(sampling={"temperature": float("inf")}))  # Python writes Infinity
    response = client_for(tmp_path / "fb.jsonl").post("/v1/feedback", content=raw,
                                                      headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "sampling.temperature"


def test_feedback_needs_the_api_key_when_the_server_has_one(tiny_chat_model, tmp_path):
    from scratchlm.serve.server import create_app

    path = tmp_path / "fb.jsonl"
    client = TestClient(create_app(*tiny_chat_model, "tiny", api_key="s3cret", feedback_path=path))
    assert client.get("/").status_code == 200  # the page itself is open: the key is typed into it
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        denied = client.post("/v1/feedback", json=feedback_body(), headers=headers)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert not path.exists()
    allowed = client.post("/v1/feedback", json=feedback_body(), headers={"Authorization": "Bearer s3cret"})
    assert allowed.status_code == 200 and len(lines_of(path)) == 1


def test_unwritable_feedback_path_fails_when_the_routes_are_made(tmp_path):
    with pytest.raises(OutputFileError, match="is a folder"):
        web_routes(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputFileError, match="cannot write here"):
        web_routes(blocker / "fb.jsonl")


def test_read_feedback_names_the_bad_line(tmp_path):
    path = tmp_path / "fb.jsonl"
    append_feedback(path, PreferenceRecord.from_feedback(FeedbackRequest.model_validate(feedback_body())))
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"id": "broken"}\n')
    from scratchlm.errors import InputFileError

    with pytest.raises(InputFileError, match=r"fb.jsonl:2: not a feedback record"):
        read_feedback(path)


# ---- who may write, and how much -------------------------------------------------------------
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_feedback_must_be_sent_as_json(tmp_path, content_type):
    # A page of another site can POST text/plain or a form without asking the server first; it
    # cannot send application/json without a CORS preflight, which this server never allows.
    path = tmp_path / "fb.jsonl"
    headers = {} if content_type is None else {"content-type": content_type}
    response = client_for(path).post("/v1/feedback", content=json.dumps(feedback_body()), headers=headers)
    assert response.status_code == 415 and "application/json" in response.json()["error"]["message"]
    assert not path.exists()
    ok = client_for(path).post("/v1/feedback", content=json.dumps(feedback_body()),
                               headers={"content-type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200


@pytest.mark.parametrize("headers", [
    {"sec-fetch-site": "cross-site"},
    {"sec-fetch-site": "same-site"},  # another port or subdomain of the same site is another origin
    {"sec-fetch-site": "cross-site", "origin": "http://testserver"},
    {"origin": "http://evil.example"},
    {"origin": "http://testserver.evil.example"},
    {"origin": "null"},  # a sandboxed frame or a file: page
])
def test_feedback_from_a_page_of_another_site_is_refused(tmp_path, headers):
    path = tmp_path / "fb.jsonl"
    response = client_for(path).post("/v1/feedback", json=feedback_body(), headers=headers)
    assert response.status_code == 403 and response.json()["error"]["code"] == "cross_site_request"
    assert not path.exists()


@pytest.mark.parametrize("headers", [
    {"sec-fetch-site": "same-origin", "origin": "http://testserver"},  # the chat page's own fetch
    {"sec-fetch-site": "same-origin", "origin": "https://chat.example.org"},  # behind a proxy that sets Host
    {"origin": "http://testserver"},  # an older browser: no Sec-Fetch-Site
    {},  # not a browser: curl, a script
])
def test_feedback_from_the_page_itself_or_a_non_browser_client_is_taken(tmp_path, headers):
    response = client_for(tmp_path / "fb.jsonl").post("/v1/feedback", json=feedback_body(), headers=headers)
    assert response.status_code == 200, response.text


def test_a_feedback_record_over_the_cap_is_a_413_and_not_written(tmp_path):
    path = tmp_path / "fb.jsonl"
    client = client_for(path, max_record_bytes=2000)
    response = client.post("/v1/feedback", json=feedback_body(rating=None, completion="x" * 600, edited="y" * 600))
    assert response.status_code == 413  # 2 x 1200 characters: the reply twice, as completion and rejected
    assert "2,000" in response.json()["error"]["message"] and not path.exists()
    assert client.post("/v1/feedback", json=feedback_body(completion="x" * 600)).status_code == 200


def test_a_full_feedback_file_refuses_more_with_a_clear_error_and_keeps_its_lines(tmp_path):
    path = tmp_path / "fb.jsonl"
    path.write_bytes(b"x" * 1000 + b"\n")
    client = client_for(path, max_file_bytes=2000)
    assert client.post("/v1/feedback", json=feedback_body()).status_code == 200  # about 300 bytes: fits
    before = path.read_bytes()
    response = client.post("/v1/feedback", json=feedback_body(completion="z" * 1000))
    assert response.status_code == 507
    error = response.json()["error"]
    assert error["code"] == "feedback_file_full" and "full" in error["message"] and str(tmp_path) not in error["message"]
    assert path.read_bytes() == before
    with pytest.raises(FeedbackFileFullError, match="the feedback file is full"):
        append_feedback(path, PreferenceRecord.from_feedback(FeedbackRequest.model_validate(feedback_body())),
                        max_file_bytes=len(before))


def test_a_new_feedback_file_is_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "fb.jsonl"
    umask = os.umask(0)  # even with a umask that would let everyone read it
    try:
        assert client_for(path).post("/v1/feedback", json=feedback_body()).status_code == 200
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == FEEDBACK_FILE_MODE == 0o600


def test_feedback_responses_never_show_the_files_path(tmp_path):
    folder = tmp_path / "private-folder"
    client = client_for(folder / "fb.jsonl")
    ok = client.post("/v1/feedback", json=feedback_body())
    assert ok.status_code == 200 and "private-folder" not in ok.text
    (folder / "fb.jsonl").unlink()
    folder.rmdir()
    folder.write_text("now a file: the folder cannot be made")
    failed = client.post("/v1/feedback", json=feedback_body())
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    assert "private-folder" not in failed.text and str(tmp_path) not in failed.text


# ---- in a browser --------------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium, run headless as root in a container, with nothing that phones home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WAIT_MS = 30_000  # generous: CI machines are slow, and a passing run never waits this long
TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. A café in the old town serves crème brûlée.\n"
    "Numbers 1 2 3 and 日本語のテキスト, русский текст, emoji 🙂 end.\n"
) * 20


def require_browser(chromium: Path = CHROMIUM) -> None:
    """Skip without a browser on a developer's machine; in CI (CI set) its absence is a failure."""
    missing = None
    if not chromium.is_file():
        missing = f"{chromium} is missing (apt-get install chromium)"
    elif importlib.util.find_spec("playwright") is None:
        missing = "the playwright package is missing (pip install playwright; no browser download needed)"
    if missing and os.environ.get("CI"):
        pytest.fail(f"{missing}: CI must run the browser test")
    if missing:
        pytest.skip(missing)


def test_missing_browser_skips_locally_but_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        require_browser(tmp_path / "chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser test"):
        require_browser(tmp_path / "chromium")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for this file's browser tests; each test opens its own page."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class HeldGPT(GPT):
    """The tiny random model for the browser. It never draws a stop token, so every reply has
    text and runs to its max tokens; and a forward pass waits at `gate` while `hold()` says so,
    which holds a reply part-way for as long as a test needs, whatever the machine's speed."""

    def __init__(self, config, never: Sequence[int]) -> None:
        super().__init__(config)
        self.never = list(never)
        self.gate = threading.Event()
        self.hold: Callable[[], bool] = lambda: False
        self.holding = threading.Event()  # a pass waits at the gate

    def forward(self, *args, **kwargs):
        if not self.gate.is_set() and self.hold():
            self.holding.set()
            self.gate.wait()
        logits, loss = super().forward(*args, **kwargs)
        logits[..., self.never] = float("-inf")
        return logits, loss


@pytest.fixture(scope="module")
def tiny_weights():
    tokenizer = train_bpe([TRAIN_TEXT], vocab_size=300, workers=1, min_frequency=1)
    torch.manual_seed(0)
    model = GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size))  # 128 positions
    return model.config, model.state_dict(), tokenizer


@pytest.fixture
def tiny_chat_model(tiny_weights):
    """(model, tokenizer): a HeldGPT of its own for each test, holding nothing until told to."""
    config, weights, tokenizer = tiny_weights
    model = HeldGPT(config, chat_stop_ids(tokenizer))
    model.load_state_dict(weights)
    return model.eval(), tokenizer


# The text of the (last) reply on the page is `expected`.
REPLY_SHOWS = """(expected) => {
    const texts = document.querySelectorAll("[data-role=assistant] [data-testid=message-text]");
    return texts.length > 0 && texts[texts.length - 1].textContent === expected;
}"""


def open_page(browser, url: str, script_errors: list[str]):
    page = browser.new_page()
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.goto(url + "/")
    return page


@pytest.mark.slow
def test_chat_page_streams_a_reply_and_saves_rating_and_edit_in_chromium(browser, tiny_chat_model, tmp_path,
                                                                          monkeypatch):
    import httpx
    from playwright.sync_api import expect

    from scratchlm.serve.server import ServerThread, create_app

    model, tokenizer = tiny_chat_model
    feedback = tmp_path / "feedback" / "chat.jsonl"
    app = create_app(model, tokenizer, "tiny", feedback_path=feedback)
    script_errors: list[str] = []
    with ServerThread(app) as server:
        page = open_page(browser, server.url, script_errors)
        try:
            expect(page.get_by_test_id("model-name")).to_have_text("tiny", timeout=WAIT_MS)
            page.get_by_label("System prompt").fill("You are terse.")
            page.get_by_label("Temperature").fill("0")  # greedy: the reply can be checked against the API's
            page.get_by_label("Max tokens").fill("20")
            expect(page.locator("#max-tokens-value")).to_have_text("20")

            # A message, and the reply streaming in: the server holds it once it has sent some
            # text, and the page must show that text while the rest does not exist yet.
            generations = submitted_generations(app, monkeypatch)
            model.hold = lambda: any(generation.stream.text for generation in generations)
            page.get_by_label("Message").fill("Hello there")
            page.get_by_label("Message").press("Enter")
            assert model.holding.wait(WAIT_MS / 1000), "the reply never had any text"
            [generation] = generations
            held = generation.stream.text  # all sent: no stop strings, so nothing is held back
            assert generation.finish_reason is None
            page.wait_for_function(REPLY_SHOWS, arg=held, timeout=WAIT_MS)
            expect(page.get_by_test_id("thumbs-up")).to_have_count(0)  # tools come when it ends
            model.gate.set()
            expect(page.get_by_test_id("thumbs-up")).to_have_count(1, timeout=WAIT_MS)
            reply = page.get_by_test_id("message-text").nth(1).text_content()
            assert reply.startswith(held) and len(reply) > len(held)

            # Thumbs up, then an edit of the same reply.
            page.get_by_test_id("thumbs-up").click()
            expect(page.get_by_test_id("feedback-status")).to_have_text("Saved", timeout=WAIT_MS)
            expect(page.get_by_test_id("thumbs-up")).to_have_attribute("aria-pressed", "true")
            page.get_by_test_id("edit").click()
            page.get_by_test_id("edit-text").fill("A better answer.")
            page.get_by_test_id("edit-save").click()
            expect(page.get_by_test_id("message-text").nth(1)).to_have_text("A better answer.")
            expect(page.get_by_test_id("feedback-status")).to_have_text("Saved", timeout=WAIT_MS)

            # The conversation goes on from the edited answer; rate the second reply down.
            page.get_by_label("Message").fill("And then?")
            page.get_by_test_id("send").click()
            expect(page.get_by_test_id("thumbs-down")).to_have_count(2, timeout=WAIT_MS)
            page.get_by_test_id("thumbs-down").nth(1).click()
            expect(page.get_by_test_id("feedback-status").nth(1)).to_have_text("Saved", timeout=WAIT_MS)

            # An API error is shown with the server's message, and the message is kept to fix.
            too_long = "word " * 300  # more than the tiny model's 128 positions
            page.get_by_label("Message").fill(too_long)
            page.get_by_test_id("send").click()
            expect(page.get_by_test_id("error")).to_contain_text("context", timeout=WAIT_MS)  # the server's own message
            expect(page.get_by_label("Message")).to_have_value(too_long.strip())
            expect(page.get_by_test_id("message")).to_have_count(4)

            page.get_by_test_id("new-chat").click()
            expect(page.get_by_test_id("message")).to_have_count(0)
            expect(page.get_by_test_id("error")).to_be_hidden()

            # The page reassembled the stream into exactly the text the API returns whole.
            messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
            direct = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "temperature": 0, "top_p": 0.95, "max_tokens": 20, "messages": messages})
            assert direct.json()["choices"][0]["message"]["content"] == reply
        finally:
            model.gate.set()  # so that the server can stop, whatever failed
            page.close()
    assert script_errors == []

    first, second, third = read_feedback(feedback)
    system, user = {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}
    assert [m.model_dump() for m in first.messages] == [system, user]
    assert (first.completion, first.rating, first.edited, first.chosen) == (reply, "up", None, None)
    assert first.model == "tiny" and first.reply_id.startswith("chatcmpl-")
    assert first.sampling == {"temperature": 0.0, "top_p": 0.95, "max_tokens": 20}
    assert (second.reply_id, second.rating, second.edited) == (first.reply_id, "up", "A better answer.")
    assert (second.chosen, second.rejected) == ("A better answer.", reply)
    assert [m.model_dump() for m in third.messages] == [
        system, user, {"role": "assistant", "content": "A better answer."}, {"role": "user", "content": "And then?"}]
    assert third.rating == "down" and third.reply_id != first.reply_id and third.edited is None
    assert len(latest_per_reply([first, second, third])) == 2


@pytest.mark.slow
def test_chat_page_sends_the_api_key_to_chat_and_feedback_in_chromium(browser, tiny_chat_model, tmp_path):
    from playwright.sync_api import expect

    from scratchlm.serve.server import ServerThread, create_app

    feedback = tmp_path / "feedback.jsonl"
    app = create_app(*tiny_chat_model, "tiny", api_key="sk-page", feedback_path=feedback)
    script_errors: list[str] = []
    with ServerThread(app) as server:
        page = open_page(browser, server.url, script_errors)
        try:
            # The page says where the key goes at once, rather than the API's advice on headers.
            error = page.get_by_test_id("error")
            expect(error).to_have_text("This server needs an API key: enter it in the API key field.",
                                       timeout=WAIT_MS)
            expect(page.get_by_test_id("model-name")).to_have_text("")
            page.get_by_label("Max tokens").fill("5")
            page.get_by_label("Message").fill("Hello")
            page.get_by_test_id("send").click()
            expect(page.get_by_label("Message")).to_have_value("Hello", timeout=WAIT_MS)
            expect(error).to_contain_text("enter it in the API key field")

            page.get_by_label("API key").fill("sk-wrong")  # a changed key asks for the model list again
            expect(error).to_have_text("The server refused this API key: correct it in the API key field.",
                                       timeout=WAIT_MS)
            page.get_by_label("API key").fill("sk-page")
            expect(page.get_by_test_id("model-name")).to_have_text("tiny", timeout=WAIT_MS)  # before any message
            expect(error).to_be_hidden()
            expect(page.locator("#max-tokens-value")).to_have_text("5")  # the user's choice stays
            page.get_by_test_id("send").click()
            expect(page.get_by_test_id("thumbs-up")).to_have_count(1, timeout=WAIT_MS)
            expect(error).to_be_hidden()
            page.get_by_test_id("thumbs-up").click()
            expect(page.get_by_test_id("feedback-status")).to_have_text("Saved", timeout=WAIT_MS)
        finally:
            page.close()
    assert script_errors == []
    (record,) = read_feedback(feedback)
    assert record.rating == "up" and record.messages[-1].content == "Hello"


@pytest.mark.slow
def test_chat_page_fits_max_tokens_to_a_small_context_and_marks_a_stopped_reply_in_chromium(
        browser, tiny_chat_model, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    from scratchlm.serve.server import ServerThread, create_app

    model, tokenizer = tiny_chat_model
    app = create_app(model, tokenizer, "tiny", feedback_path=tmp_path / "feedback.jsonl")
    script_errors: list[str] = []
    with ServerThread(app) as server:
        page = open_page(browser, server.url, script_errors)
        try:
            # The slider follows the model's 128-token context: at most 128, half of it by default.
            expect(page.get_by_test_id("model-name")).to_have_text("tiny", timeout=WAIT_MS)
            slider = page.get_by_label("Max tokens")
            expect(slider).to_have_attribute("max", "128")
            expect(slider).to_have_value("64")
            expect(page.locator("#max-tokens-value")).to_have_text("64")
            page.get_by_label("Temperature").fill("0")

            # All of the context for the reply: the server is left to give what the prompt leaves,
            # not asked for more than fits, which it would refuse.
            slider.fill("128")
            expect(page.locator("#max-tokens-value")).to_have_text("128")
            page.get_by_label("Message").fill("Hello there")
            page.get_by_label("Message").press("Enter")
            expect(page.get_by_test_id("thumbs-up")).to_have_count(1, timeout=WAIT_MS)
            expect(page.get_by_test_id("error")).to_be_hidden()
            assert page.get_by_test_id("message-text").nth(1).text_content()

            # Stop while a reply streams: what arrived stays, marked as stopped. The server holds
            # the reply once it has sent some text, until the stop cancels it: it cannot end first.
            generations = submitted_generations(app, monkeypatch)
            cancel = Generation.cancel

            def cancel_and_open(generation: Generation) -> None:
                cancel(generation)
                if generation in generations:
                    model.gate.set()

            monkeypatch.setattr(Generation, "cancel", cancel_and_open)
            model.hold = lambda: any(generation.stream.text for generation in generations)
            page.get_by_test_id("new-chat").click()
            slider.fill("100")
            page.get_by_label("Message").fill("The quick brown fox")
            page.get_by_test_id("send").click()
            assert model.holding.wait(WAIT_MS / 1000), "the reply never had any text"
            [generation] = generations
            held_tokens = len(generation.token_ids)
            page.wait_for_function(REPLY_SHOWS, arg=generation.stream.text, timeout=WAIT_MS)
            page.get_by_test_id("stop").click()
            expect(page.get_by_test_id("thumbs-up")).to_have_count(1, timeout=WAIT_MS)
            expect(page.get_by_test_id("reply-cut")).to_have_text("(stopped)")
            expect(page.get_by_test_id("error")).to_be_hidden()
            # The stop reached the server: the pass it held was the generation's last.
            assert wait_until(lambda: generation.finish_reason is not None)
            assert (generation.finish_reason, len(generation.token_ids)) == ("cancelled", held_tokens + 1)
        finally:
            model.gate.set()  # so that the server can stop, whatever failed
            page.close()
    assert script_errors == []
