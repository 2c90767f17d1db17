"""kvjax.serve.server on localhost (uvicorn in a thread): the official `openai` client
(completions, chat, streaming), OpenAI-shaped 4xx errors after which the server keeps serving,
and a client that disconnects mid-stream freeing its row. The tiny model with the character
tokenizer runs unmarked; SmolLM2 runs in the slow test."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import kvjax
from kvjax.serve import Engine
from kvjax.serve.server import create_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Running:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread until `close()`."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(tiny_model):
    engine = Engine(tiny_model, "dense", rows=4, token_budget=64)
    srv = _Running(create_app(engine, "tiny"))
    yield srv, engine
    srv.close()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_completions_chat_and_streaming(served, tiny_model):
    srv, _ = served
    client = _client(srv)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    want = kvjax.generate(tiny_model, "the cat", max_new_tokens=8)
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=0)
    assert r.choices[0].text == want.texts[0] and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tiny_model.tokenizer.encode("the cat"))
    pieces = [
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=0, stream=True)
    ]
    assert "".join(pieces) == r.choices[0].text
    msgs = [{"role": "user", "content": "hi there"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    ref = kvjax.generate(tiny_model, messages=msgs, max_new_tokens=6)
    assert chat.choices[0].message.content == ref.texts[0] and chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.texts[0]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


BAD = [
    (b"{not json", 400, None),
    (b'{"model": "gpt-4", "prompt": "hi"}', 404, "model_not_found"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": -3}', 400, None),
    (b'{"model": "tiny", "prompt": "' + b"a" * 520 + b'", "max_tokens": 4}', 400, "context_length_exceeded"),
    (b'{"model": "tiny", "prompt": "hi", "policy": "snapkv:budget=0.2"}', 400, "unsupported_parameter"),
    (b'{"model": "tiny", "prompt": "hi", "n": 2}', 400, None),
    (b'{"model": "tiny", "prompt": 5}', 400, None),
    (b'{"model": "tiny", "prompt": "hi", "temperature": "hot"}', 400, None),
    (b'{"model": "tiny", "prompt": "hi", "stop": ""}', 400, None),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    srv, _ = served
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for body, status, code in BAD:
            r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error" and err["code"] == code, (body, err)
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "boss", "content": "x"}]})
        assert r.status_code == 400 and "role" in r.json()["error"]["message"]
        r = http.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert http.get("/health").json()["status"] == "ok"
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_client_disconnect_mid_stream_frees_its_row(served):
    srv, engine = served
    before = engine.stats.get("finished_cancelled", 0)
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert all(line.startswith("data: ") or not line for line in got)
            assert http.get("/health").json()["running"] == 1
        deadline = time.monotonic() + 30
        while http.get("/health").json()["running"]:
            assert time.monotonic() < deadline, "the row was not freed after the client went away"
            time.sleep(0.1)
    assert engine.stats["finished_cancelled"] == before + 1


@pytest.mark.slow
def test_openai_client_against_smollm2(smollm2):
    """The real model: greedy completions equal kvjax.generate; chat streams."""
    engine = Engine(smollm2, "snapkv:budget=0.5,window=16", rows=4, token_budget=128)
    srv = _Running(create_app(engine, "smollm2"))
    try:
        client = _client(srv)
        prompt = "The capital of France is"
        want = kvjax.generate(smollm2, prompt, policy="snapkv:budget=0.5,window=16", max_new_tokens=8)
        r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].text == want.texts[0]
        msgs = [{"role": "user", "content": "Say hello."}]
        chunks = list(
            client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0, stream=True)
        )
        ref = kvjax.generate(smollm2, messages=msgs, policy="snapkv:budget=0.5,window=16", max_new_tokens=8)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.texts[0]
    finally:
        srv.close()
