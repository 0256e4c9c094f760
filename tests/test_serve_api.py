"""The OpenAI-compatible HTTP API (`scratchlm serve`).

Error cases and response shapes go through FastAPI's TestClient; the official `openai` client,
concurrency, disconnects and the command line go through a real uvicorn server on 127.0.0.1.
A tiny random model serves every test but one real chat round trip with SmolLM2.
"""

import asyncio
import contextlib
import copy
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from scratchlm.cli import main
from scratchlm.errors import ConfigError
from scratchlm.model import GPT
from scratchlm.model.folder import save_model_folder
from scratchlm.serve import server as server_module
from scratchlm.tokenizer.chat_template import chat_stop_ids
from scratchlm.serve.engine import Generation
from scratchlm.serve.server import ServerThread, _sampling_error, create_app, uvicorn_config
from serve_helpers import submitted_generations, wait_until

NAME = "tiny"
KEY = "sk-test-key"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


# `tokenizer` and `model` (128 positions) are conftest's.


@pytest.fixture(scope="module")
def client(model, tokenizer, tmp_path_factory):
    app = create_app(model, tokenizer, NAME, feedback_path=tmp_path_factory.mktemp("fb") / "feedback.jsonl")
    with TestClient(app) as test_client:  # `with`: runs the lifespan, which starts the scheduler
        yield test_client


@pytest.fixture(scope="module")
def server(model, tokenizer, tmp_path_factory):
    app = create_app(model, tokenizer, NAME, max_batch=8, feedback_path=tmp_path_factory.mktemp("fb") / "f.jsonl")
    with ServerThread(app) as running:
        yield running


def scheduler_of(app):
    return app.state.served.scheduler


def completion(**changes) -> dict:
    return {"model": NAME, "prompt": "The quick", "max_tokens": 5, "temperature": 0, **changes}


def chat(**changes) -> dict:
    return {"model": NAME, "messages": CHAT, "max_tokens": 5, "temperature": 0, **changes}


def assert_openai_error(response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


def sse_payloads(text: str) -> list[dict]:
    """The JSON payloads of a server-sent event stream, which must end with `data: [DONE]`."""
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in text.split("\n\n") if line)
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


# ---- bad input: 400 with OpenAI's error body ------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", completion(max_tokens=-1), "max_tokens"),
        ("/v1/completions", completion(max_tokens=0), "max_tokens"),
        ("/v1/completions", completion(max_tokens=10**12), "max_tokens"),  # the prompt fits: max_tokens is at fault
        ("/v1/completions", completion(prompt="fox " * 200), "prompt"),  # over the 128-token context
        ("/v1/completions", completion(prompt="fox " * 200, max_tokens=None), "prompt"),
        ("/v1/completions", completion(n=9), "n"),
        ("/v1/completions", completion(n=0), "n"),
        ("/v1/completions", completion(temperature=2.5), "temperature"),
        ("/v1/completions", completion(temperature=-0.1), "temperature"),
        ("/v1/completions", completion(top_p=0), "top_p"),
        ("/v1/completions", completion(top_k=-1), "top_k"),
        ("/v1/completions", completion(min_p=1.5), "min_p"),
        ("/v1/completions", completion(frequency_penalty=3), "frequency_penalty"),
        ("/v1/completions", completion(presence_penalty=-2.5), "presence_penalty"),
        ("/v1/completions", completion(repetition_penalty=0), "repetition_penalty"),
        ("/v1/completions", completion(stop=["a", "b", "c", "d", "e"]), "stop"),
        ("/v1/completions", completion(stop=""), "stop"),
        ("/v1/completions", completion(stop=["a", ""]), "stop"),
        ("/v1/completions", completion(logprobs=2), "logprobs"),
        ("/v1/completions", completion(suffix="end"), "suffix"),
        ("/v1/completions", completion(prompt=[]), "prompt"),
        ("/v1/completions", completion(prompt={"text": "hi"}), "prompt"),
        ("/v1/completions", completion(prompt=[1, 2, 10**6]), "prompt"),
        ("/v1/completions", completion(stream_options={"include_usage": True}), "stream_options"),
        ("/v1/completions", completion(best_of=2), "best_of"),
        ("/v1/completions", {"prompt": "hi"}, "model"),
        ("/v1/chat/completions", chat(messages=[]), "messages"),
        ("/v1/chat/completions", chat(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
        ("/v1/chat/completions", chat(messages=[{"role": "user"}]), "messages"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "hi", "mood": "happy"}]), "messages.0.mood"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
         "messages.0.content"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "fox " * 200}]), "messages"),
        ("/v1/chat/completions", chat(max_tokens=120), "max_tokens"),  # prompt + max_tokens > 128
        ("/v1/chat/completions", chat(max_tokens=None, max_completion_tokens=120), "max_completion_tokens"),
        ("/v1/chat/completions", chat(max_completion_tokens=-5), "max_completion_tokens"),
        ("/v1/chat/completions", chat(logprobs=True), "logprobs"),
        ("/v1/chat/completions", chat(top_logprobs=3), "top_logprobs"),
        ("/v1/chat/completions", chat(tools=[{"type": "function"}]), "tools"),
        ("/v1/chat/completions", chat(n=100), "n"),
        ("/v1/chat/completions", chat(stop=5), "stop"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
        ("/v1/chat/completions", chat(messages=[{"role": "assistant", "content": "hi", "tool_calls": [{"id": "1"}]}]),
         "messages.0.tool_calls"),
        ("/v1/chat/completions", chat(seed="abc"), "seed"),
        ("/v1/completions", completion(max_tokens="5"), "max_tokens"),
        ("/v1/completions", completion(max_tokens=True), "max_tokens"),
        ("/v1/completions", completion(max_tokens=5.0), "max_tokens"),
        ("/v1/completions", completion(stream="yes"), "stream"),
        ("/v1/completions", completion(stream=1), "stream"),
        ("/v1/completions", completion(echo=1), "echo"),
        ("/v1/completions", completion(temperature="0.5"), "temperature"),
        ("/v1/completions", completion(temperature=True), "temperature"),
        ("/v1/completions", completion(seed=1e30), "seed"),
        ("/v1/completions", completion(logit_bias={"1": 5}), "logit_bias"),
        ("/v1/chat/completions", chat(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage"),
        ("/v1/chat/completions", chat(response_format={"type": "json_object"}), "response_format"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
         "messages.0.content.0.text"),
    ],
)
def test_bad_request_is_a_400_with_an_openai_error_body(client, path, body, param):
    error = assert_openai_error(client.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    assert scheduler_of(client.app).active == 0 and scheduler_of(client.app).waiting == 0


@pytest.mark.parametrize(
    "raw", [b"{not json", b'{"model": "tiny", "prompt": "hi",}', b"", b"[1, 2]", b'"a string"', b"\xff\xfe"]
)
def test_malformed_body_is_a_400_never_a_500(client, raw):
    response = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/completions", completion(max_tokens="5"), "max_tokens must be an integer, not the string"),
        ("/v1/completions", completion(max_tokens=True), "max_tokens must be an integer, not true"),
        ("/v1/completions", completion(stream="yes"), "stream must be true or false"),
        ("/v1/completions", completion(seed=1e30), "seed must be an integer, not 1e+30"),
        ("/v1/completions", completion(n=0), "n must be >= 1, not 0"),
        ("/v1/completions", completion(stop=""), "stop must not be an empty string"),
        ("/v1/chat/completions", chat(stop=5), "stop must be a string or a list, not 5"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
         "only text content parts"),
        ("/v1/chat/completions", chat(tools=[{"type": "function"}]), "'tools' is not supported by this server"),
        ("/v1/chat/completions", chat(tool_choice="auto"), "'tool_choice' is not supported by this server"),
        ("/v1/chat/completions", chat(mood="happy"), "unknown field 'mood'"),
        ("/v1/chat/completions", chat(messages=[{"role": "robot", "content": "hi"}]),
         "must be one of system, developer, user, assistant, not 'robot'"),
        ("/v1/chat/completions", chat(max_tokens=120), "maximum context length is 128 tokens"),
    ],
)
def test_bad_request_messages_say_what_is_wrong_in_json_terms(client, path, body, words):
    error = assert_openai_error(client.post(path, json=body), 400)
    assert words in error["message"], error
    assert "sampling:" not in error["message"] and "Input should" not in error["message"]


@pytest.mark.parametrize(
    ("raw", "words"),
    [(b"", "the request body is empty"), (b"[1, 2]", "must be a JSON object, not a list"),
     (b'{"model": "tiny", "prompt": "caf\xe9"}', "not UTF-8 (byte 0xe9 at offset 32)"),
     (b'{"model": "tiny", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", "an integer of more than 4300 digits")],
)
def test_malformed_body_messages_say_what_is_wrong(client, raw, words):
    response = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, None)
    assert words in error["message"], error


def test_null_unsupported_fields_ask_for_nothing(client):
    # Some clients send every field; null asks for no tools, so it is not refused.
    body = chat(tools=None, tool_choice=None, response_format=None, logit_bias=None)
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_a_float_field_takes_a_json_integer(client):
    response = client.post("/v1/completions", json=completion(temperature=1, top_p=1, repetition_penalty=1))
    assert response.status_code == 200, response.text


def test_sampling_config_errors_name_the_request_field():
    error = _sampling_error(ConfigError("sampling: max_new_tokens must be >= 1, not 0"), "max_completion_tokens")
    assert (error.param, error.message) == ("max_completion_tokens", "max_completion_tokens must be >= 1, not 0")
    error = _sampling_error(ConfigError("sampling: top_p must be in (0, 1], not 2"), "max_tokens")
    assert (error.param, error.message) == ("top_p", "top_p must be in (0, 1], not 2")
    error = _sampling_error(ConfigError("sampling: stop_token_ids must be token ids"), "max_tokens")
    assert (error.param, error.message) == (None, "stop_token_ids must be token ids")  # not a request field


def test_non_finite_numbers_are_refused(client):
    raw = b'{"model": "tiny", "prompt": "hi", "temperature": NaN}'
    error = assert_openai_error(client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert error["param"] in ("temperature", None)


def test_megabytes_of_prompt_are_refused_without_tokenizing(client, monkeypatch):
    tokenizer = client.app.state.served.tokenizer
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized a text that cannot fit"))
    huge = "x" * 500_000  # under the body cap, far over what the context holds
    assert_openai_error(client.post("/v1/completions", json=completion(prompt=huge)), 400, "prompt")
    messages = [{"role": "user", "content": huge}]
    assert_openai_error(client.post("/v1/chat/completions", json=chat(messages=messages)), 400, "messages")


def test_null_fields_mean_the_defaults(client):
    nulls = dict.fromkeys(["temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                           "repetition_penalty", "stop", "seed", "n", "stream", "stream_options", "user", "echo",
                           "logprobs", "suffix"])
    body = client.post("/v1/completions", json=completion(**nulls)).json()
    # temperature 1 and no seed: the draw may be the end token at once, so the count may be 0
    [choice] = body["choices"]
    assert (choice["finish_reason"] == "length") == (body["usage"]["completion_tokens"] == 5)
    assert choice["finish_reason"] in ("stop", "length")


def test_unknown_model_is_a_404_like_openai(client):
    error = assert_openai_error(client.post("/v1/completions", json=completion(model="gpt-4")), 404, "model")
    assert error["code"] == "model_not_found" and "tiny" in error["message"]
    assert_openai_error(client.post("/v1/chat/completions", json=chat(model="gpt-4")), 404, "model")
    assert_openai_error(client.get("/v1/models/gpt-4"), 404, "model")


def test_unknown_route_and_wrong_method_keep_the_error_shape(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)


# ---- response shapes -----------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [NAME]
    assert body["data"][0]["object"] == "model"
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME


def test_health_reports_the_scheduler(client):
    body = client.get("/health").json()
    assert body == {"status": "ok", "model": NAME, "active": 0, "waiting": 0}


def test_completion_has_openai_shape_and_counts_tokens(client, tokenizer):
    body = client.post("/v1/completions", json=completion(max_tokens=7)).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == NAME
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode("The quick"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 7
    assert (choice["finish_reason"] == "length") == (usage["completion_tokens"] == 7)


def test_several_prompts_and_n_give_one_choice_each_in_order(client):
    body = client.post("/v1/completions", json=completion(prompt=["The quick", [5, 6, 7]], n=2, echo=True)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"].startswith("The quick") for c in body["choices"][:2])
    assert body["usage"]["prompt_tokens"] == len(client.app.state.served.tokenizer.encode("The quick")) + 3


def test_greedy_is_deterministic_and_seeded_choices_differ_but_repeat(client):
    greedy = [client.post("/v1/completions", json=completion(max_tokens=12)).json()["choices"][0]["text"] for _ in range(2)]
    assert greedy[0] == greedy[1]
    seeded = completion(max_tokens=12, temperature=1.0, seed=7, n=3)
    first = [c["text"] for c in client.post("/v1/completions", json=seeded).json()["choices"]]
    again = [c["text"] for c in client.post("/v1/completions", json=seeded).json()["choices"]]
    assert first == again
    assert len(set(first)) > 1  # seed + i per choice


def test_stop_string_ends_the_completion_before_it(client):
    full = client.post("/v1/completions", json=completion(max_tokens=30)).json()["choices"][0]["text"]
    assert len(full) > 6
    stop = full[4:6]
    cut = client.post("/v1/completions", json=completion(max_tokens=30, stop=[stop])).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_chat_completion_has_openai_shape(client):
    body = client.post("/v1/chat/completions", json=chat(max_tokens=None, max_completion_tokens=6, n=2, seed=1, temperature=1.0)).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == NAME
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_chat_accepts_text_parts_and_the_developer_role(client):
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    as_parts = client.post("/v1/chat/completions", json=chat(messages=parts)).json()
    as_text = client.post("/v1/chat/completions", json=chat()).json()
    assert as_parts["usage"] == as_text["usage"]
    assert as_parts["choices"][0]["message"] == as_text["choices"][0]["message"]


def test_chat_stream_is_role_then_deltas_then_finish_usage_and_done(client):
    response = client.post("/v1/chat/completions", json=chat(max_tokens=8, stream=True,
                                                            stream_options={"include_usage": True}))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(response.text)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *deltas, final, usage = chunks
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and final["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in deltas)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in deltas)
    whole = client.post("/v1/chat/completions", json=chat(max_tokens=8)).json()
    assert text == whole["choices"][0]["message"]["content"]
    assert usage["usage"] == whole["usage"]


def test_completion_stream_concatenates_to_the_whole_completion(client):
    response = client.post("/v1/completions", json=completion(max_tokens=10, stream=True, echo=True))
    chunks = sse_payloads(response.text)
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    whole = client.post("/v1/completions", json=completion(max_tokens=10, echo=True)).json()["choices"][0]
    assert text == whole["text"] and text.startswith("The quick")
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


# ---- API key -------------------------------------------------------------------------------
def test_api_key_guards_v1_but_not_the_page_or_health(model, tokenizer, tmp_path):
    app = create_app(model, tokenizer, NAME, api_key=KEY, feedback_path=tmp_path / "fb.jsonl")
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            error = assert_openai_error(client.post("/v1/completions", json=completion(), headers=headers), 401, None)
            assert error["code"] == "invalid_api_key"
        # 401 before the body is even looked at: no key, no information about the request
        assert_openai_error(client.post("/v1/completions", content=b"{bad", headers={}), 401)
        assert_openai_error(client.get("/v1/models"), 401)
        assert_openai_error(client.post("/v1/feedback", json={}), 401)
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.post("/v1/completions", json=completion(), headers=good).status_code == 200
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200


# ---- a real server: the openai client, concurrency, disconnects ------------------------------
def test_openai_client_round_trip(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [NAME]
    done = client.completions.create(model=NAME, prompt="The quick", max_tokens=6, temperature=0,
                                     extra_body={"top_k": 5, "repetition_penalty": 1.1})
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens >= 1
    streamed = client.completions.create(model=NAME, prompt="The quick", max_tokens=6, temperature=0, stream=True,
                                         extra_body={"top_k": 5, "repetition_penalty": 1.1})
    assert "".join(chunk.choices[0].text for chunk in streamed) == done.choices[0].text

    reply = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=6, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=NAME, messages=[], max_tokens=6)
    assert bad.value.status_code == 400 and "messages" in bad.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")


def test_openai_client_needs_the_key(model, tokenizer, tmp_path):
    app = create_app(model, tokenizer, NAME, api_key=KEY, feedback_path=tmp_path / "fb.jsonl")
    with ServerThread(app) as running:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=running.url + "/v1", api_key=KEY, max_retries=0)
        assert client.completions.create(model=NAME, prompt="hi", max_tokens=2).choices


class GatedGPT(GPT):
    """The tiny model held by a gate: after its first `free_passes` forward passes, each waits for
    `gate`, so nothing the model does next happens before the test (or what it set up to open the
    gate) allows it, whatever the machine's speed. The logits of the ids in `never` are -inf: with
    the stop tokens there, no generation can end before its max_tokens, whatever it draws."""

    def __init__(self, config, gate: threading.Event, free_passes: int = 0, never: Sequence[int] = ()) -> None:
        super().__init__(config)
        self.gate, self.free_passes, self.never = gate, free_passes, list(never)
        self.passes = 0  # only the scheduler's thread runs the model

    def forward(self, *args, **kwargs):
        self.passes += 1
        if self.passes > self.free_passes:
            self.gate.wait()
        logits, loss = super().forward(*args, **kwargs)
        if self.never:
            logits[..., self.never] = float("-inf")
        return logits, loss


def gated_model(model: GPT, gate: threading.Event, free_passes: int = 0, never: Sequence[int] = ()) -> GatedGPT:
    """A GatedGPT with the weights of `model`."""
    gated = GatedGPT(model.config, gate, free_passes, never)
    gated.load_state_dict(model.state_dict())
    return gated.eval()


@contextlib.contextmanager
def raw_request(server, path: str, body: dict) -> Iterator[socket.socket]:
    """POST `body` on a plain socket; the client leaves (closes it) when the block ends, without
    reading a byte of the answer."""
    payload = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload))
        yield raw


def test_concurrent_streams_all_complete_and_are_batched(model, tokenizer, tmp_path, monkeypatch):
    # The first request's prefill waits at the gate until all six requests are queued, so the
    # next round admits the others at once; as none can end before its 8 tokens, the step after
    # decodes all six together.
    gate = threading.Event()
    endless = gated_model(model, gate, never=chat_stop_ids(tokenizer))
    app = create_app(endless, tokenizer, NAME, max_batch=8, feedback_path=tmp_path / "fb.jsonl")
    results: list = [None] * 6

    def one_stream(i: int) -> None:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=8, temperature=1.0, seed=i,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        results[i] = (chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens)

    with ServerThread(app) as running:
        scheduler = scheduler_of(app)
        queued = submitted_generations(app, monkeypatch)
        threads = [threading.Thread(target=one_stream, args=(i,)) for i in range(len(results))]
        try:
            for thread in threads:
                thread.start()
            assert wait_until(lambda: len(queued) == len(results), timeout=30)
        finally:
            gate.set()  # also on failure, so that the streams and the scheduler can end
            for thread in threads:
                thread.join(timeout=60)
    assert results == [("length", 8)] * len(results)
    assert scheduler.peak_active == len(results)  # batched together, not one after another


@pytest.mark.parametrize("stream", [False, True], ids=["whole_reply", "stream"])
def test_a_client_leaving_a_running_request_cancels_it_within_one_step(model, tokenizer, tmp_path, monkeypatch,
                                                                       stream):
    # After the prefill, each forward pass waits for a gate that only a cancel opens, and no stop
    # token can be drawn: the generation cannot end unless the client's leaving cancels it.
    gate = threading.Event()
    cancelled: list[Generation] = []
    cancel = Generation.cancel

    def cancel_and_open(generation: Generation) -> None:
        cancel(generation)
        cancelled.append(generation)
        gate.set()

    monkeypatch.setattr(Generation, "cancel", cancel_and_open)
    endless = gated_model(model, gate, free_passes=1, never=chat_stop_ids(tokenizer))
    app = create_app(endless, tokenizer, NAME, feedback_path=tmp_path / "fb.jsonl")
    with ServerThread(app) as server:
        try:
            scheduler = scheduler_of(app)
            with raw_request(server, "/v1/chat/completions", chat(max_tokens=60, temperature=1.0, stream=stream)):
                assert wait_until(lambda: scheduler.active == 1, timeout=30), "never admitted"  # its next pass waits
                assert not cancelled
            assert wait_until(lambda: cancelled and cancelled[0].finish_reason is not None, timeout=30)
            [generation] = set(cancelled)
            # Two tokens, the prefill's and that of the pass the gate held: the slot was freed at
            # the step after the cancel, out of the 60 the request asked for.
            assert (generation.finish_reason, len(generation.token_ids)) == ("cancelled", 2)
            assert scheduler.active == 0 and scheduler.waiting == 0
        finally:
            gate.set()


def test_full_queue_is_a_503(model, tokenizer, tmp_path):
    with gated_server(model, tokenizer, tmp_path, max_queue=1) as (_server, scheduler, http):
        with http.stream("POST", "/v1/completions", json=completion(stream=True)) as second:
            assert second.status_code == 200 and wait_until(lambda: scheduler.waiting == 1)
            error = assert_openai_error(http.post("/v1/completions", json=completion()), 503)
            assert error["type"] == "server_error"
            assert scheduler.waiting == 1 and scheduler.active == 0  # the first is in its prefill, at the gate


@pytest.mark.slow
def test_smollm2_chat_round_trip(smollm2, tmp_path):
    model, tokenizer = smollm2
    app = create_app(model, tokenizer, "smollm2", feedback_path=tmp_path / "fb.jsonl")
    with ServerThread(app) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30, temperature=0,
        )
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"  # ended at <|im_end|>, which is not in the text
    assert "<|im_end|>" not in reply.choices[0].message.content


# ---- the command line ----------------------------------------------------------------------
def test_serve_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--api-key", "--max-batch", "--max-queue", "--max-body", "--allowed-host",
                   "--device", "--feedback", "--feedback-max-size", "--model-name"):
        assert option in out


@pytest.mark.parametrize(("args", "words"), [(["--max-body", "lots"], "'lots' is not a size"),
                                             (["--max-body", "0"], "max_body must be >= 1"),
                                             (["--max-queue", "0"], "max_queue must be >= 1"),
                                             (["--feedback-max-size", "1TB?"], "is not a size")])
def test_serve_bad_limits_are_one_line_errors_before_the_model_loads(tmp_path, capsys, args, words):
    try:  # a size that does not parse is argparse's usage error, a bad value the library's
        status = main(["serve", str(tmp_path / "no-model-here"), "--port", "0", *args])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(("scratchlm: error: ", "scratchlm serve: error: "))
    assert words in err and err.count("\n") == 1


def test_serve_port_in_use_is_a_one_line_error(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scratchlm: error: serve: cannot listen on 127.0.0.1:") and err.count("\n") == 1


def test_a_client_that_connects_as_soon_as_the_url_is_printed_is_not_refused():
    # `serve` prints its URL before uvicorn's loop accepts: the socket must already listen, so
    # the connection waits in the backlog (CI once saw "connection refused" here under load).
    sock = server_module.listen_socket("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname()[:2], timeout=10):
            pass
    finally:
        sock.close()


@pytest.mark.slow
def test_serve_command_answers_and_stops_on_ctrl_c(model, tokenizer, tmp_path):
    save_model_folder(tmp_path / "tiny-model", model, tokenizer)
    process = subprocess.Popen(
        [sys.executable, "-m", "scratchlm.cli", "serve", str(tmp_path / "tiny-model"), "--port", "0",
         "--feedback", str(tmp_path / "fb.jsonl")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("serving tiny-model at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split("/v1")[0]
        assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) in (0, 130)
    finally:
        process.kill()
        process.wait()


# ---- limits: what one request may ask for ------------------------------------------------------
@contextlib.contextmanager
def gated_server(model, tokenizer, tmp_path, max_queue: int):
    """(server, scheduler, http client) with one slot, held by a first streaming request that
    waits at the gate; the gate opens at the end so the scheduler can stop."""
    gate = threading.Event()
    app = create_app(gated_model(model, gate), tokenizer, NAME, max_batch=1, max_queue=max_queue,
                     feedback_path=tmp_path / "fb.jsonl")
    with ServerThread(app) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        try:  # opened before anything closes, so that the scheduler can stop even after a failure
            scheduler = scheduler_of(app)
            with http.stream("POST", "/v1/completions", json=completion(stream=True)) as first:
                assert first.status_code == 200
                assert wait_until(lambda: scheduler.waiting == 0)  # admitted: its prefill waits at the gate
                yield running, scheduler, http
        finally:
            gate.set()


def test_a_refused_request_leaves_nothing_in_the_queue(model, tokenizer, tmp_path):
    with gated_server(model, tokenizer, tmp_path, max_queue=2) as (_server, scheduler, http):
        with http.stream("POST", "/v1/completions", json=completion(stream=True)) as second:
            assert second.status_code == 200 and wait_until(lambda: scheduler.waiting == 1)
            # n=2 needs two places and one is left: refused whole, so nothing of it stays queued
            assert_openai_error(http.post("/v1/chat/completions", json=chat(n=2)), 503)
            assert scheduler.waiting == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole_reply", "stream"])
def test_a_client_leaving_while_its_request_waits_cancels_every_generation_of_it(model, tokenizer, tmp_path,
                                                                                 monkeypatch, stream):
    cancelled: list[Generation] = []
    cancel = Generation.cancel
    monkeypatch.setattr(Generation, "cancel", lambda self: (cancelled.append(self), cancel(self))[1])
    with gated_server(model, tokenizer, tmp_path, max_queue=4) as (server, scheduler, _http):
        with raw_request(server, "/v1/chat/completions", chat(n=3, stream=stream)):
            assert wait_until(lambda: scheduler.waiting == 3)
        # the first request is still streaming: every generation cancelled is one of the three that left
        assert wait_until(lambda: len(set(cancelled)) == 3)
        assert all(not generation.token_ids for generation in cancelled)


def test_n_is_capped_below_the_queue_size(model, tokenizer, tmp_path):
    app = create_app(model, tokenizer, NAME, max_queue=2, feedback_path=tmp_path / "fb.jsonl")
    with TestClient(app) as client:
        error = assert_openai_error(client.post("/v1/chat/completions", json=chat(n=3)), 400, "n")
        assert "at most 2" in error["message"]
        # two prompts x n=2: four generations, more than the queue could ever hold
        error = assert_openai_error(client.post("/v1/completions", json=completion(prompt=["a", "b"], n=2)), 400, "n")
        assert "4 generations" in error["message"]
        assert client.post("/v1/chat/completions", json=chat(n=2)).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "hi"}] * 1025), "messages", "at most 1024"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 257}]),
         "messages.0.content", "at most 256"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "hi", "name": "n" * 257}]),
         "messages.0.name", "at most 256"),
        ("/v1/completions", completion(model="m" * 257), "model", "at most 256"),
        ("/v1/completions", completion(user="u" * 257), "user", "at most 256"),
    ],
)
def test_field_limits_are_400s_naming_the_field_and_the_limit(client, path, body, param, words):
    error = assert_openai_error(client.post(path, json=body), 400, param)
    assert words in error["message"], error
    assert "m" * 257 not in error["message"]  # a long value is not echoed back


def test_token_id_prompts_are_checked_before_any_decoding(client, monkeypatch):
    served = client.app.state.served
    monkeypatch.setattr(served.tokenizer, "decode", lambda *a, **k: pytest.fail("decoded a prompt it then refused"))
    too_long = [1] * (served.context + 1)
    for prompt in (too_long, [too_long], [[1, 2], too_long]):
        error = assert_openai_error(client.post("/v1/completions", json=completion(prompt=prompt)), 400, "prompt")
        assert f"{served.context + 1} tokens" in error["message"]
    for prompt in ([1, 2, 10**30], [[1], [-1]]):
        assert_openai_error(client.post("/v1/completions", json=completion(prompt=prompt)), 400, "prompt")


# ---- limits: the request body ------------------------------------------------------------------
def test_a_body_over_the_cap_is_a_413_with_an_openai_error_body(model, tokenizer, tmp_path):
    app = create_app(model, tokenizer, NAME, max_body=2000, feedback_path=tmp_path / "fb.jsonl")
    with TestClient(app) as client:
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/feedback"):
            error = assert_openai_error(client.post(path, json=completion(prompt="x" * 3000)), 413, None)
            assert "2,000 bytes" in error["message"] and "--max-body" in error["message"]
        assert client.post("/v1/completions", json=completion(prompt="x" * 10)).status_code == 200
    assert not (tmp_path / "fb.jsonl").exists()


def test_default_body_cap_refuses_megabytes_of_feedback(client):
    body = {"model": NAME, "messages": CHAT, "completion": "x" * 3_000_000, "rating": "up"}
    assert_openai_error(client.post("/v1/feedback", json=body), 413, None)


def drive_asgi(app, headers: list[tuple[bytes, bytes]], chunks: int, chunk: bytes) -> tuple[int, int]:
    """Send `chunks` body chunks (the last with more_body false) to `app` directly; (the
    response status, how many chunks the app asked for)."""
    asked = 0
    statuses = []

    async def receive() -> dict:
        nonlocal asked
        asked += 1
        return {"type": "http.request", "body": chunk, "more_body": asked < chunks}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    return statuses[0], asked


def test_body_cap_stops_reading_as_soon_as_the_bytes_received_pass_it(model, tokenizer, tmp_path):
    app = create_app(model, tokenizer, NAME, max_body=2500, feedback_path=tmp_path / "fb.jsonl")
    # no Content-Length (chunked): 100 chunks of 1000 bytes; the third passes the cap
    assert drive_asgi(app, [], chunks=100, chunk=b"x" * 1000) == (413, 3)
    # a Content-Length over the cap: refused before a byte of the body is read
    assert drive_asgi(app, [(b"content-length", b"100000")], chunks=100, chunk=b"x" * 1000) == (413, 0)
    assert drive_asgi(app, [], chunks=2, chunk=b"x" * 1000)[0] == 400  # under the cap: the app reads it (not JSON)


# ---- limits: who may ask ------------------------------------------------------------------------
ROUTES = [("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/feedback"),
          ("POST", "/v1/chat/completions")]


def test_a_loopback_server_answers_only_to_loopback_host_names(model, tokenizer, tmp_path):
    # DNS rebinding: a page from evil.example whose name now resolves to 127.0.0.1 reaches the
    # server with `Host: evil.example`; a loopback server answers to loopback names only.
    app = create_app(model, tokenizer, NAME, feedback_path=tmp_path / "fb.jsonl")
    with TestClient(app, base_url="http://127.0.0.1:8000") as local:
        for host in ("127.0.0.1:8000", "localhost:8000", "LocalHost", "[::1]:8000", "127.0.0.2", "localhost:9000"):
            assert local.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example", "[::2]"):
            for method, path in ROUTES:
                error = assert_openai_error(local.request(method, path, headers={"Host": host}, json=chat()), 421, None)
                assert "--allowed-host" in error["message"]
    assert not (tmp_path / "fb.jsonl").exists()


def test_allowed_hosts_let_a_proxys_name_through(model, tokenizer, tmp_path):
    app = create_app(model, tokenizer, NAME, allowed_hosts=["chat.example.org"], feedback_path=tmp_path / "fb.jsonl")
    with TestClient(app, base_url="http://127.0.0.1:8000") as local:
        assert local.get("/v1/models", headers={"Host": "chat.example.org"}).status_code == 200
        assert local.get("/v1/models", headers={"Host": "localhost:8000"}).status_code == 200
        assert_openai_error(local.get("/v1/models", headers={"Host": "evil.example"}), 421)


def test_a_server_on_a_network_address_leaves_the_host_to_its_api_key(model, tokenizer, tmp_path):
    app = create_app(model, tokenizer, NAME, feedback_path=tmp_path / "fb.jsonl")
    with TestClient(app, base_url="http://192.0.2.7:8000") as remote:
        assert remote.get("/health", headers={"Host": "chat.example.org"}).status_code == 200


def test_uvicorn_runs_with_connection_keep_alive_and_header_limits(model, tokenizer, tmp_path):
    app = create_app(model, tokenizer, NAME, max_batch=4, max_queue=16, feedback_path=tmp_path / "fb.jsonl")
    config = uvicorn_config(app)
    # enough connections for a full queue and a full batch, and not unbounded
    assert 16 + 4 <= config.limit_concurrency <= 16 + 4 + 64
    assert config.timeout_keep_alive <= 5 and config.h11_max_incomplete_event_size <= 16 * 1024
    assert config.http == "h11"  # the header limit above is h11's


def test_an_unexpected_error_is_a_500_that_keeps_its_details_in_the_log(model, tokenizer, tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(13, "Permission denied", "/home/someone/secret/file")

    monkeypatch.setattr(server_module, "_chat_prompt", broken)
    app = create_app(model, tokenizer, NAME, feedback_path=tmp_path / "fb.jsonl")
    with TestClient(app, raise_server_exceptions=False) as client:
        error = assert_openai_error(client.post("/v1/chat/completions", json=chat()), 500, None)
    assert error["type"] == "server_error" and "/home/someone" not in error["message"]


# ---- chat templates that fail -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("template", "status", "words"),
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", 500, "steps"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", 500, "RecursionError"),
        ("{% for m in messages %}", 500, "not valid Jinja"),
        ("{{ raise_exception('no system messages') }}", 400, "refused the conversation: no system messages"),
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", 400, "render to more than"),
    ],
    ids=["runaway", "recursion", "invalid", "refusal", "huge_output"],
)
def test_a_chat_template_failure_is_a_clear_error(model, tokenizer, tmp_path, template, status, words):
    # The template comes with the model: a broken one is the server's fault (500), one that
    # refuses the conversation or renders it too long for the context is the request's (400).
    own = copy.deepcopy(tokenizer)
    own.metadata["chat_template"] = template
    app = create_app(model, own, NAME, feedback_path=tmp_path / "fb.jsonl")
    with TestClient(app) as client:
        error = assert_openai_error(client.post("/v1/chat/completions", json=chat()), status)
        assert words in error["message"], error
        assert error["type"] == ("server_error" if status == 500 else "invalid_request_error")
        assert (error["param"] == "messages") == (status == 400)
        assert scheduler_of(app).waiting == 0 and scheduler_of(app).active == 0
