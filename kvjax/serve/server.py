"""An OpenAI-compatible HTTP server over `kvjax.serve.Engine` (starlette, run by uvicorn).

    app = create_app(Engine(model, "snapkv:budget=0.2+kivi:bits=2"), model_name="smollm2")
    uvicorn.run(app, port=8000)          # or: kvjax serve --model smollm2 --policy ... --port 8000

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `"stream": true`
for server-sent events ending in `data: [DONE]`), `GET /v1/models`, `GET /health`. The engine
steps in its own thread, started and stopped with the app; a request's tokens reach its
handler through an asyncio queue.

Request fields read: model (must be the served name), prompt (a string, or one string / one
list of token ids in a list) or messages (chat, rendered with the model's chat template),
max_tokens (max_completion_tokens for chat; default 16 for completions, the rest of the
context for chat), temperature (default 1, as OpenAI's), top_p, top_k (an extension, as
vLLM's), seed, stop (a string or a list), stream, n (1 only), user (ignored). Refused with a
400 (never ignored): n > 1, logprobs, echo, best_of > 1, non-zero presence/frequency
penalties, logit_bias, tools, and a per-request `policy` — the cache policy is the server's
(`kvjax serve --policy`), one for every row of the live state, so a request cannot pick
another. Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for
malformed JSON or a bad field, 404 for an unknown model or route, 400 with code
`context_length_exceeded` for a prompt that with max_tokens does not fit the model's context
(refused, not truncated). A client that disconnects mid-stream cancels its request, which
frees its row at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import numbers
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..generation.request import ROLES
from .engine import Engine, Event

#: Fields a request may carry that the server does not implement: refused with a 400, with
#: the value each may take to mean "off".
UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _number(body: dict, name: str, default, lo: float, hi: float | None = None, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, numbers.Integral if integer else numbers.Real) and not isinstance(v, bool)
    if not ok or v < lo or (hi is not None and v > hi):
        kind = "an integer" if integer else "a number"
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(400, f"{name}={v!r} must be {kind} {rng}", name)
    return int(v) if integer else float(v)


class _Params:
    """The checked fields of one completion or chat request."""

    def __init__(self, body, server: Server, chat: bool):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is None:
            raise ApiError(400, "missing field 'model'", "model")
        if model != server.model_name:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server serves '{server.model_name}'",
                "model",
                "model_not_found",
            )
        if body.get("policy") is not None:
            raise ApiError(
                400,
                f"policy={body['policy']!r}: a per-request cache policy is not supported; every request uses the "
                f"server's policy {server.engine.policy.spec()!r} (set with kvjax serve --policy)",
                "policy",
                "unsupported_parameter",
            )
        for name, off in UNSUPPORTED.items():
            if name in body and body[name] not in off:
                raise ApiError(
                    400, f"{name}={body[name]!r} is not supported by this server", name, "unsupported_parameter"
                )
        if _number(body, "n", 1, 1, integer=True) != 1:
            raise ApiError(400, f"n={body['n']!r}: this server returns one choice per request (n=1)", "n")
        tok, cfg = server.engine.model.tokenizer, server.engine.model.config
        self.ids = self._chat_ids(body, tok) if chat else self._prompt_ids(body, tok, cfg.vocab_size)
        if not self.ids:
            raise ApiError(400, "the prompt is empty (zero tokens)", "messages" if chat else "prompt")
        room = cfg.max_position - len(self.ids)
        field = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        default = max(room, 1) if chat else 16
        self.max_tokens = _number(body, field, default, 1, integer=True)
        if len(self.ids) + self.max_tokens > cfg.max_position:
            raise ApiError(
                400,
                f"This model's maximum context length is {cfg.max_position} tokens. However, you requested "
                f"{len(self.ids) + self.max_tokens} tokens ({len(self.ids)} in the prompt, {self.max_tokens} for "
                "the completion). Please reduce the prompt or the completion length.",
                field,
                "context_length_exceeded",
            )
        self.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        self.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if self.top_p == 0.0:
            raise ApiError(400, "top_p=0 must be in (0, 1]", "top_p")
        self.top_k = _number(body, "top_k", 0, 0, integer=True) if self.temperature > 0 else 0
        if self.temperature == 0:
            self.top_p = 1.0
        self.seed = _number(body, "seed", 0, 0, 2**32 - 1, integer=True)
        stop = body.get("stop")
        listed = isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)
        if stop is not None and not isinstance(stop, str) and not listed:
            raise ApiError(400, f"stop={stop!r} must be a string or a list of up to 4 non-empty strings", "stop")
        self.stop = None if stop is None or stop == [] else stop
        self.stream = body.get("stream", False)
        if not isinstance(self.stream, bool):
            raise ApiError(400, f"stream={self.stream!r} must be true or false", "stream")

    @staticmethod
    def _prompt_ids(body, tok, vocab: int) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            return tok.encode(p) if p else []
        if isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            if any(not 0 <= i < vocab for i in p):
                raise ApiError(400, f"prompt holds token ids outside the vocabulary [0, {vocab})", "prompt")
            return list(p)
        raise ApiError(
            400, f"prompt={p!r} must be a string, a list of token ids, or a list with one of those", "prompt"
        )

    @staticmethod
    def _chat_ids(body, tok) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "messages must be a non-empty list of {'role', 'content'} objects", "messages")
        conv = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ApiError(400, f"messages[{i}] must be an object with a role in {list(ROLES)}", "messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
                content = "".join(c.get("text", "") for c in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string", "messages")
            conv.append({"role": m["role"], "content": content})
        return tok.encode(tok.apply_chat_template(conv))


class Server:
    """The engine, the served model name and the request handlers (see module doc)."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.created = int(time.time())

    async def _submit(self, p: _Params):
        """Submit to the engine; returns (handle, asyncio queue of its Events)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(ev: Event):
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        try:
            handle = self.engine.submit(
                p.ids,
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                top_k=p.top_k,
                top_p=p.top_p,
                seed=p.seed,
                stop=p.stop,
                on_event=on_event,
            )
        except (TypeError, ValueError) as e:
            raise ApiError(400, str(e)) from e
        return handle, queue

    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from e
        p = _Params(body, self, chat)
        handle, queue = await self._submit(p)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if p.stream:
            return StreamingResponse(
                self._stream(handle, queue, rid, created, chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            while True:
                ev = await queue.get()
                if ev.finished:
                    break
        finally:
            if not handle.done:  # the handler was cancelled (the client went away)
                handle.cancel()
        if ev.finish_reason == "error":
            raise ApiError(500, f"generation failed: {ev.error}")
        usage = {
            "prompt_tokens": handle.prompt_tokens,
            "completion_tokens": len(handle.tokens),
            "total_tokens": handle.prompt_tokens + len(handle.tokens),
        }
        reason = ev.finish_reason
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": handle.text}, "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": handle.text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return JSONResponse(
            {
                "id": rid,
                "object": obj,
                "created": created,
                "model": self.model_name,
                "choices": [choice],
                "usage": usage,
            }
        )

    def _chunk(self, rid: str, created: int, chat: bool, text: str | None, reason: str | None, first=False) -> str:
        if chat:
            delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        body = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    async def _stream(self, handle, queue: asyncio.Queue, rid: str, created: int, chat: bool):
        """Server-sent events: a chunk per printable piece, then the finish reason, then [DONE].
        Closing the generator early (the client disconnected) cancels the request."""
        try:
            if chat:
                yield self._chunk(rid, created, chat, "", None, first=True)
            while True:
                ev = await queue.get()
                if ev.finished:
                    break
                if ev.text:
                    yield self._chunk(rid, created, chat, ev.text, None)
            if ev.finish_reason == "error":
                err = {
                    "error": {
                        "message": f"generation failed: {ev.error}",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
                yield f"data: {json.dumps(err)}\n\n"
            else:
                yield self._chunk(rid, created, chat, None, ev.finish_reason)
            yield "data: [DONE]\n\n"
        finally:
            if not handle.done:
                handle.cancel()

    async def models(self, request: Request):
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "kvjax"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request):
        stats = self.engine.stats
        keys = ("running", "prefilling", "waiting", "kv_bytes_reserved", "kv_bytes_needed", "kv_bytes_prefill")
        keys += ("bucket", "policy", "steps", "programs")
        return JSONResponse({"status": "ok", "model": self.model_name, **{k: stats[k] for k in keys}})


async def _api_error(request: Request, exc: ApiError):
    return exc.response()


async def _http_error(request: Request, exc: HTTPException):
    code = "not_found" if exc.status_code == 404 else None
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code).response()


def create_app(engine: Engine, model_name: str) -> Starlette:
    """The ASGI app serving `engine` under the name `model_name` (module doc). The engine's
    thread starts with the app and stops with it."""
    server = Server(engine, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    routes = [
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={ApiError: _api_error, HTTPException: _http_error}
    )
    app.state.server = server
    return app
