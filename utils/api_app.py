"""The HTTP API of api_demo.py: the original's /api/chat, an OpenAI-compatible API and a chat page.

Run it with `python api_demo.py [--model_dir DIR] [--port 8812]`, or `uvicorn api_demo:app`
(settings from CHATLM_<FIELD> environment variables), then:

    curl -s -X POST http://127.0.0.1:8812/api/chat -H "Content-Type: application/json" -d '{"input_txt": "感冒了要怎么办"}'

Endpoints under /api and /v1 need `Authorization: Bearer KEY` when a key is set (--api_key,
--api_key_file or CHATLM_API_KEY; compared in constant time). Public: GET/HEAD /, /health
(request counters only with the key), /static/*, /docs and /openapi.json.

- POST /api/chat            {"input_txt": "..."} -> {"response": "..."}, as the original (an
                            empty input_txt gets 406, its status code).
- POST /v1/chat/completions OpenAI's chat.completion; `stream: true` gives server-sent
                            chat.completion.chunk events ending with `data: [DONE]`. The model
                            answers single questions: the last user message is the question.
                            temperature > 0 samples (with top_p), otherwise greedy (the default).
- GET  /v1/models, GET /health, GET / (the chat page, utils/static/chat.html).

Limits (InferConfig): max_input_chars and max_new_tokens_cap give 400, max_body_bytes 413,
body_timeout 408; header_timeout, keep_alive_timeout and max_connections bound slow and idle
connections (utils/http_limits.py). Bodies are validated strictly as OpenAI does ("2" is not
an int, "yes" not a bool): under /v1 a bad body is a 400 invalid_request_error in OpenAI's
{"error": {...}} shape, so its clients show the message; /api/chat answers FastAPI's 422
{"detail"}. No exception text ever reaches a client (500: "internal error", logged here).

Generation runs off the event loop in the model's Batcher thread (model/infer.py): requests
arriving together are generated as one batch (up to max_batch_size; later ones join the next
batch), each streamed to its own client and ending at its own EOS or max_tokens. A client that
disconnects (streaming, or while waiting for a whole answer) leaves its batch within one
decoding step, on every endpoint.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import hmac
import ipaddress
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from config import InferConfig
from model.text_files import bad_bytes
from utils.cli import UserError, parse_config
from utils.text_cleaning import unpaired_surrogate

STATIC_DIR = Path(__file__).resolve().parent / "static"
PROTECTED_PREFIXES = ("/api/", "/v1/")
CONFIG_ENV = "CHATLM_INFER_CONFIG"  # hands the parsed config (never the key) to uvicorn's worker processes
ENV_PREFIX = "CHATLM_"  # CHATLM_<FIELD> sets an InferConfig field for `uvicorn api_demo:app`
API_KEY_ENV = ENV_PREFIX + "API_KEY"
log = logging.getLogger("chatlm.api")


# ---- request bodies --------------------------------------------------------------------------
def _valid_unicode(text: str) -> str:
    problem = unpaired_surrogate(text)  # JSON may carry "\\ud800"
    if problem:
        raise ValueError(f"{problem}: send valid Unicode text")
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
# strict: as OpenAI's API, "2" is not an int and "yes" not a bool (a number is still a float).
STRICT = ConfigDict(strict=True, extra="ignore")


class ChatInput(BaseModel):
    model_config = STRICT
    input_txt: Text


class TextPart(BaseModel):
    model_config = STRICT
    type: str
    text: Text = ""


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Fields that do not change the answer (user, seed, ...) are accepted and ignored; those that
    # would (tools, a JSON response_format, logprobs) are refused in _completion_settings.
    model_config = STRICT
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # newer clients' name for max_tokens
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: Annotated[Text, Field(min_length=1)] | list[Annotated[Text, Field(min_length=1)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None
    logprobs: bool | None = None


# ---- errors ----------------------------------------------------------------------------------
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 406: "invalid_request_error", 408: "invalid_request_error",
                413: "invalid_request_error", 422: "invalid_request_error"}
INTERNAL_ERROR = "internal error: the server could not answer this request (details are in the server's log)"


def error_response(path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    if path.startswith("/v1/"):
        body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                          "param": None, "code": None}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"malformed JSON at character {loc[-1] if loc else '?'}{': ' + detail if detail else ''}")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request body: " + "; ".join(parts)


class Guard:
    """ASGI middleware: the API key, then the body size limit, before FastAPI sees the request.

    As middleware (not a FastAPI dependency) so a request without the key is refused before
    its body is read or parsed, and an oversized body is never buffered past the limit.
    Hand-written because the body limit built into recent FastAPI (`max_body_size`) is absent
    from most of the FastAPI versions requirements.txt admits, and answers in another shape.
    """

    def __init__(self, app, api_key: str, max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.api_key = api_key.encode("utf-8")
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.api_key and path.startswith(PROTECTED_PREFIXES):
            auth = headers.get("authorization", b"")
            if not _has_key(auth, self.api_key):
                scheme, _, token = auth.partition(b" ")
                message = ("missing API key: send the header 'Authorization: Bearer <key>'"
                           if scheme.lower() != b"bearer" or not token.strip() else "invalid API key")
                resp = error_response(path, 401, message, {"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._too_large(path, scope, receive, send)
        # Read the (bounded) body now, within body_timeout, then replay it to the app; later
        # receive() calls go to the server, so the app still hears about a client disconnect.
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body = message.get("body", b"")
                    size += len(body)
                    if size > self.max_body_bytes:
                        return await self._too_large(path, scope, receive, send)
                    chunks.append(body)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            resp = error_response(path, 408, f"request body not received within {self.body_timeout:g} s "
                                             "(body_timeout)", {"Connection": "close"})
            return await resp(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, path, scope, receive, send):
        resp = error_response(path, 413, f"request body too large: the limit is {self.max_body_bytes} bytes "
                                         "(max_body_bytes)", {"Connection": "close"})
        await resp(scope, receive, send)


# ---- the app ---------------------------------------------------------------------------------
class _GenerationResponse(StreamingResponse):
    """A streamed answer whose generation stops whenever the response ends, a disconnect included."""

    def __init__(self, answer_stream, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.answer_stream = answer_stream
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.answer_stream.stop()
            self.on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _has_key(authorization: str | bytes, api_key: str | bytes) -> bool:
    """Whether an Authorization header carries `Bearer <api_key>` (compared in constant time)."""
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1")
    if isinstance(api_key, str):
        api_key = api_key.encode("utf-8")
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and bool(token.strip()) and hmac.compare_digest(token.strip(), api_key)


async def _answer_while_connected(request: Request, bot, *args):
    """bot.answer(*args) in a worker thread, stopped early if the client goes away meanwhile
    (a client that gave up while queued or waiting must not cost a whole generation)."""
    from model.infer import GenerationControl

    control = GenerationControl()
    job = asyncio.ensure_future(run_in_threadpool(bot.answer, *args, control=control))
    while True:
        done, _ = await asyncio.wait({job}, timeout=0.2)
        if done:
            return job.result()
        if not control.stopped and await request.is_disconnected():
            control.stop()


def _bad_body_status(request: Request) -> int:
    """OpenAI answers a bad body with 400 invalid_request_error; /api/chat keeps FastAPI's 422."""
    return 400 if request.url.path.startswith("/v1/") else 422


async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's answer to a body its JSON parser gave up on (nested too deeply, or bytes
        # that are not UTF-8): still a malformed body, so the same status as any other.
        why = "it could not be parsed as JSON"
        if isinstance(exc.__cause__, UnicodeDecodeError):
            why = f"it is not UTF-8 ({bad_bytes(exc.__cause__)}); send JSON as UTF-8"
        return error_response(request.url.path, _bad_body_status(request), f"invalid request body: {why}")
    return error_response(request.url.path, exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError):
    message = _validation_message(exc)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        # FastAPI reads only a JSON content type as JSON (a web page could otherwise post one
        # cross-site without a preflight); `curl -d` sends application/x-www-form-urlencoded
        message = (f"invalid request body: it was sent as {media_type}; send JSON with the header "
                   "Content-Type: application/json")
    return error_response(request.url.path, _bad_body_status(request), message)


async def _internal_error(request: Request, exc: Exception):
    log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(request.url.path, 500, INTERNAL_ERROR)


MAX_STOPS = 4  # OpenAI's limit on `stop` sequences


def _completion_settings(req: ChatCompletionRequest, config: InferConfig) -> tuple[str, int, float, float]:
    """(question, max_new_tokens, temperature, top_p) of an OpenAI request, or a 400 naming what is wrong."""
    if req.n != 1:
        raise HTTPException(400, "only n=1 is supported")
    if req.tools or req.functions:
        raise HTTPException(400, "tools are not supported: this model answers in plain text")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise HTTPException(400, f"response_format {req.response_format.get('type')!r} is not supported: "
                                 "only 'text' (this model cannot be held to a JSON format)")
    if req.logprobs:
        raise HTTPException(400, "logprobs are not supported")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOPS:
        raise HTTPException(400, f"stop has {len(req.stop)} sequences; at most {MAX_STOPS}")
    users = [m for m in req.messages if m.role == "user"]
    if not users:
        raise HTTPException(400, "messages must contain a user message")
    question = users[-1].text()  # the model answers single questions, not conversations
    if not question.strip():
        raise HTTPException(400, "the last user message is empty")
    _check_input(question, "the last user message", config)
    max_new = req.max_completion_tokens or req.max_tokens or config.max_seq_len
    if max_new > config.max_new_tokens_cap:
        raise HTTPException(400, f"max_tokens is {max_new}; the limit is {config.max_new_tokens_cap} "
                                 "(max_new_tokens_cap)")
    return question, max_new, req.temperature or 0.0, req.top_p if req.top_p is not None else 1.0


def _check_input(text: str, field: str, config: InferConfig) -> None:
    if len(text) > config.max_input_chars:
        raise HTTPException(400, f"{field} is {len(text)} characters; the limit is {config.max_input_chars} "
                                 "(max_input_chars)")


def _usage(ans) -> dict:
    return {"prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.completion_tokens,
            "total_tokens": ans.prompt_tokens + ans.completion_tokens}


class StopAt:
    """Cuts an answer before the first of the client's stop sequences (OpenAI `stop`), also
    across streamed pieces. What could still be the start of a sequence (the last longest-1
    characters) is held back until the next piece or the end: a sequence that begins in what was
    sent would already lie wholly in the text seen."""

    def __init__(self, stops: str | list[str] | None) -> None:
        self.stops = [stops] if isinstance(stops, str) else list(stops or [])
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending, self.hit = "", False

    def feed(self, piece: str) -> str:
        """The part of the answer so far that can be sent now."""
        if self.hit:
            return ""
        text = self.pending + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.pending = True, ""
            return text[:cut]
        keep = min(self.hold, len(text))
        self.pending = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        rest, self.pending = ("" if self.hit else self.pending), ""
        return rest

    def cut(self, ans):
        """A whole answer cut at the first stop sequence (finish_reason "stop" when one was met)."""
        text = self.feed(ans.text) + self.flush()
        return replace(ans, text=text, finish_reason="stop") if self.hit else ans


class _Reply:
    """One OpenAI answer's bodies: a chat.completion, or the chat.completion.chunk events of a stream."""

    def __init__(self, cid: str, created: int, model: str) -> None:
        self.cid, self.created, self.model = cid, created, model

    def head(self, obj: str) -> dict:
        return {"id": self.cid, "object": obj, "created": self.created, "model": self.model}

    def completion(self, ans) -> dict:
        return {**self.head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ans.text},
                             "logprobs": None, "finish_reason": ans.finish_reason}],
                "usage": _usage(ans)}

    def chunk(self, delta: dict, finish_reason=None) -> str:
        return _sse({**self.head("chat.completion.chunk"),
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    async def events(self, stream, include_usage: bool, stop: StopAt):
        yield self.chunk({"role": "assistant", "content": ""})
        try:
            async for piece in stream:
                text = stop.feed(piece)
                if text:
                    yield self.chunk({"content": text})
                if stop.hit:
                    stream.stop()  # the rest would be cut: stop generating it (ends within a step)
                    await run_in_threadpool(stream.join)
                    break
            rest = stop.flush()
            if rest:
                yield self.chunk({"content": rest})
        except Exception:  # reported in-band (the 200 status line is already sent), details only in the log
            log.exception("generation failed")
            yield _sse({"error": {"message": INTERNAL_ERROR, "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"
            return
        ans = stream.answer
        yield self.chunk({}, "stop" if stop.hit else ans.finish_reason)
        if include_usage:
            yield _sse({**self.head("chat.completion.chunk"), "choices": [], "usage": _usage(ans)})
        yield "data: [DONE]\n\n"


def create_app(config: InferConfig, bot=None) -> FastAPI:
    """The FastAPI app around `bot` (a model.infer.ChatBot; loaded from `config` when None)."""
    if bot is None:
        from model.infer import ChatBot
        bot = ChatBot(config)
    app = FastAPI(title="ChatLM-mini-Chinese API", version="1.0",
                  description="The original /api/chat plus an OpenAI-compatible /v1/chat/completions.")
    app.state.bot = bot
    app.state.active = 0
    created = int(time.time())

    def begin() -> None:
        app.state.active += 1

    def end() -> None:
        app.state.active -= 1

    app.add_exception_handler(StarletteHTTPException, _http_error)  # FastAPI's HTTPException, routing's 404/405
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "chat.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    @app.head("/health", include_in_schema=False)
    async def health(request: Request):
        """Public: is the server up, and with what. Load counters only for holders of the key
        (they tell an outsider when the server is busy)."""
        body = {"status": "ok", "model": config.model_name, "device": str(bot.device),
                "dtype": str(bot.dtype).removeprefix("torch.")}
        if not config.api_key or _has_key(request.headers.get("authorization", ""), config.api_key):
            body.update(active_requests=app.state.active, tokens_generated=bot.tokens_generated)
        return body

    @app.post("/api/chat")
    async def api_chat(body: ChatInput, request: Request) -> dict:
        """The original endpoint: {"input_txt": "..."} -> {"response": "..."}."""
        if not body.input_txt.strip():
            raise HTTPException(406, "input_txt must not be empty")
        _check_input(body.input_txt, "input_txt", config)
        begin()
        try:
            ans = await _answer_while_connected(request, bot, body.input_txt, None, 0.0, 1.0, config.search_type)
        finally:
            end()
        return {"response": ans.text}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "chatlm-mini-chinese"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        question, max_new, temperature, top_p = _completion_settings(req, config)
        reply = _Reply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), config.model_name)
        stop = StopAt(req.stop)
        if not req.stream:
            begin()
            try:
                ans = await _answer_while_connected(request, bot, question, max_new, temperature, top_p)
            finally:
                end()
            return reply.completion(stop.cut(ans))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        begin()
        stream = bot.stream_chat(question, max_new, temperature, top_p, asynchronous=True)
        return _GenerationResponse(stream, reply.events(stream, include_usage, stop), on_close=end,
                                   media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       body_timeout=config.body_timeout)
    return app


def config_from_env(environ=os.environ) -> InferConfig:
    """The server's settings in a process uvicorn started: the config api_demo.py handed over
    (CONFIG_ENV), else InferConfig's defaults with each CHATLM_<FIELD> variable applied (as
    `--field value`, so values are parsed and checked exactly as on api_demo.py's command line)."""
    raw = environ.get(CONFIG_ENV)
    if raw:
        return InferConfig(**json.loads(raw))
    argv = []
    for f in fields(InferConfig):
        name = ENV_PREFIX + f.name.upper()
        value = environ.get(name)
        if value is None or f.name == "api_key":  # the key is read by resolve_api_key
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):  # argparse's usage text would bury the one line that matters
                parse_config(InferConfig, [f"--{f.name}", value])
        except SystemExit:
            reason = re.sub(r"^.*?error: (argument \S+: )?", "", stderr.getvalue().strip().splitlines()[-1])
            raise UserError(f"bad environment variable {name}={value!r}: {reason}") from None
        argv += [f"--{f.name}", value]
    return parse_config(InferConfig, argv)[1]


def resolve_api_key(config: InferConfig, environ=os.environ) -> InferConfig:
    """Fill config.api_key from --api_key, else --api_key_file, else CHATLM_API_KEY (at most one)."""
    sources = [name for name, given in (("--api_key", config.api_key), ("--api_key_file", config.api_key_file),
                                        (API_KEY_ENV, environ.get(API_KEY_ENV))) if given]
    if len(sources) > 1:
        raise UserError(f"the API key is given twice ({' and '.join(sources)}): give one")
    if config.api_key_file:
        try:
            key = Path(config.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read api_key_file {config.api_key_file}: {exc}") from None
        if not key:
            raise UserError(f"api_key_file {config.api_key_file} is empty")
        config.api_key = key
    elif not config.api_key:
        config.api_key = environ.get(API_KEY_ENV, "")
    return config


def app_from_env() -> FastAPI:
    """uvicorn factory for `uvicorn api_demo:app`, --workers > 1 and --reload: each process
    loads its own model, with the settings of config_from_env."""
    return create_app(resolve_api_key(config_from_env()))


def server_settings(config: InferConfig) -> dict:
    """uvicorn.run/uvicorn.Config keyword arguments bounding slow and idle connections."""
    from utils.http_limits import LimitedH11Protocol

    return {"http": functools.partial(LimitedH11Protocol, max_connections=config.max_connections,
                                      header_timeout=config.header_timeout),
            "limit_concurrency": config.max_connections,  # requests beyond it get 503
            "timeout_keep_alive": config.keep_alive_timeout,
            "h11_max_incomplete_event_size": 16 * 1024}  # request line + headers (uvicorn's default)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bindable(host: str, port: int) -> None:
    """A --host that does not resolve or is not this machine's, or a --port already taken: one
    line before the model loads (uvicorn finds out only after it, and exits 3)."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host!r} does not resolve ({exc.strerror}): give an address of this machine, "
                        "e.g. 127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            hint = ("choose another --port or stop the program using it" if exc.errno == errno.EADDRINUSE
                    else "--host must be an address of this machine")
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}; {hint}") from None


def serve(config: InferConfig) -> None:
    """Load the model (a bad path is a one-line error before any port is bound) and run uvicorn."""
    import uvicorn

    resolve_api_key(config)
    check_bindable(config.host, config.port)  # first: no warning about a host it cannot serve on
    if not config.api_key and not _is_loopback(config.host):
        print(f"warning: serving on {config.host} without an API key: anyone who can reach this port can use "
              f"the model (set {API_KEY_ENV} or --api_key_file)", file=sys.stderr, flush=True)
    from model.infer import find_model

    config.model_dir = str(find_model(config))  # printed below: the model being served
    url = f"http://{config.host}:{config.port}"
    settings = server_settings(config)
    if config.workers == 1 and not config.reload:
        app = create_app(config)
        print(f"serving {config.model_dir} at {url} (chat page: {url}/, OpenAI API: {url}/v1)", flush=True)
        uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, **settings)
        return
    from model.infer import ChatBot
    ChatBot(config)  # fail here, once, with a clear message, rather than in every worker
    # Worker processes inherit this environment: the key goes to them in a file only this user
    # can read (removed when the server stops), never as an environment variable or argument.
    handoff = asdict(config) | {"api_key": "", "api_key_file": ""}
    os.environ.pop(API_KEY_ENV, None)
    key_dir = tempfile.mkdtemp(prefix="chatlm-key-") if config.api_key else None
    try:
        if key_dir:
            key_file = Path(key_dir) / "api_key"
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(config.api_key)
            handoff["api_key_file"] = str(key_file)
        os.environ[CONFIG_ENV] = json.dumps(handoff)
        print(f"serving {config.model_dir} at {url} with {config.workers} worker(s)", flush=True)
        uvicorn.run("utils.api_app:app_from_env", factory=True, host=config.host, port=config.port,
                    workers=config.workers, reload=config.reload, log_level=config.log_level, **settings)
    finally:
        if key_dir:
            shutil.rmtree(key_dir, ignore_errors=True)
