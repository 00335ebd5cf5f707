"""The HTTP side of the server: OpenAI's routes on FastAPI, answered from the scheduler's token events.

POST /v1/completions (JSON, or server-sent events with "stream": true), POST /v1/chat/completions (a 400:
exports carry no chat template), GET /v1/models, /health, /metrics. With --api-key the /v1 routes need
`Authorization: Bearer KEY`.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from nvium_dist.inference.generator import NviumGenerator
from nvium_dist.serving.metrics import ServerMetrics
from nvium_dist.serving.protocol import APIError, CompletionParams, check_model, parse_completion, parse_json
from nvium_dist.serving.scheduler import QueueFull, Request as Job, Scheduler, ShuttingDown

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_SECONDS = 0.5


class ChoiceText:
    """The text of one choice as its tokens arrive: stop strings end it, and a stream only sends text that
    can no longer turn out to be part of a stop string (or an incomplete UTF-8 character)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self.exits: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish_reason: str | None = None

    def add(self, token: int, exit: int) -> bool:
        """-> True when a stop string ended the choice with this token."""
        self.tokens.append(token)
        self.exits.append(exit)
        text = self.tokenizer.decode(self.tokens)
        ends = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        self.text = text[:min(ends)] if ends else text
        if ends:
            self.finish_reason = "stop"
        return bool(ends)

    def delta(self) -> str:
        end = len(self.text)
        if self.finish_reason is None:
            end -= self.holdback
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece


class CountRequests:
    """Counts responses by path and status. A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide
    a client's disconnect from `Request.is_disconnected` in the endpoint."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _logprobs(generator: NviumGenerator, sequence: list[int], first: int, top: int, text_start: int) -> dict:
    """OpenAI's logprobs object for sequence[first:], each token's log p_mix given its prefix (one full forward)."""
    tokenizer = generator.tokenizer
    positions = list(range(max(first, 1), len(sequence)))
    with torch.inference_mode():
        log_mix = generator.mixture_logprobs([sequence], at=(torch.zeros(len(positions), dtype=torch.long),
                                                             torch.tensor(positions) - 1)) if positions else None
    tokens = sequence[first:]
    token_logprobs: list[float | None] = [None] * (len(tokens) - len(positions))
    top_logprobs: list[dict | None] = [None] * len(token_logprobs)
    for i, position in enumerate(positions):
        token_logprobs.append(log_mix[i, sequence[position]].item())
        values, ids = log_mix[i].topk(top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
        top_logprobs.append({tokenizer.decode([t]): v for t, v in zip(ids.tolist(), values.tolist())})
    offsets, offset = [], text_start
    for t in tokens:
        offsets.append(offset)
        offset += len(tokenizer.decode([t]))
    return {"tokens": [tokenizer.decode([t]) for t in tokens], "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets}


def create_app(generator: NviumGenerator, scheduler: Scheduler, metrics: ServerMetrics, served_name: str,
               api_key: str | None = None, max_n: int = 16) -> FastAPI:
    tokenizer = generator.tokenizer
    exit_layers = generator.config.exit_layers
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="nvium", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):  # unknown routes, wrong methods
        return error_response(APIError(err.status_code, str(err.detail), code=str(err.status_code)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err):
        return error_response(APIError(400, str(err)))

    app.add_middleware(CountRequests, counter=metrics.requests)

    def authorize(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the server's "
                                "--api-key", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        too_big = APIError(413, f"request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise too_big
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise too_big
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the request") from None
        return parse_json(bytes(body))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created,
                                            "owned_by": "nvium", "max_model_len": generator.config.seq_length}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        check_model(await read_json(request), served_name)
        raise APIError(400, "this model's tokenizer has no chat template (nvium exports carry none), so chat "
                            "messages cannot be turned into a prompt; use /v1/completions with a text prompt")

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await read_json(request)
        check_model(body, served_name)
        params = parse_completion(body, generator, max_n)
        seed = secrets.randbits(63) if params.seed is None else params.seed
        job = Job(params.prompts, params.max_tokens, params.n, seed, params.transform, asyncio.Queue(),
                  asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull:
            raise APIError(429, f"the server's queue is full ({scheduler.max_queue} requests waiting); retry later",
                           code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", code="shutting_down", kind="server_error") from None
        metrics.prompt_tokens.inc(sum(len(p) for p in params.prompts))
        completion = Completion(job, params, request)
        if params.stream:
            return StreamingResponse(completion.stream(), media_type="text/event-stream")
        return await completion.collect()

    class Completion:
        """One request's choices, filled from the scheduler's events."""

        def __init__(self, job: Job, params: CompletionParams, request: Request):
            self.job, self.params, self.request = job, params, request
            self.id = f"cmpl-{uuid.uuid4().hex}"
            self.created = int(time.time())
            self.choices = [ChoiceText(tokenizer, params.stop) for _ in job.choices]
            self.unfinished = len(self.choices)
            self.path = scheduler.path if params.transform is None else "full-transformed"

        async def events(self):
            """(choice index, new token or None when the choice finished), until every choice finished; the
            request is cancelled in the scheduler if the consumer stops early (a disconnect)."""
            next_check = time.monotonic() + DISCONNECT_POLL_SECONDS
            try:
                while self.unfinished:
                    try:
                        event = await asyncio.wait_for(self.job.events.get(), DISCONNECT_POLL_SECONDS)
                    except TimeoutError:
                        event = None
                    if time.monotonic() >= next_check:  # checked while tokens keep arriving, too
                        next_check = time.monotonic() + DISCONNECT_POLL_SECONDS
                        if await self.request.is_disconnected():
                            return
                    if event is None:
                        continue
                    kind, index, *rest = event
                    choice = self.choices[index]
                    if choice.finish_reason is not None:
                        continue  # tokens sampled before a stop string's cancel reached the scheduler
                    if kind == "token":
                        if choice.add(*rest):
                            scheduler.cancel(self.job, index)
                        yield index, rest[0]
                    else:
                        choice.finish_reason = rest[0]
                    if choice.finish_reason is not None:
                        self.unfinished -= 1
                        yield index, None
            finally:
                if self.unfinished:
                    scheduler.cancel(self.job)

        def nvium(self, exits: list[int]) -> dict:
            return {"path": self.path, "exit_layers": [exit_layers[e] if e >= 0 else None for e in exits]}

        async def logprobs(self, index: int) -> dict | None:
            if self.params.logprobs is None:
                return None
            choice, prompt = self.choices[index], self.job.choices[index].prompt
            first = 0 if self.params.echo else len(prompt)
            start = len(tokenizer.decode(prompt)) if not self.params.echo else 0
            return await asyncio.to_thread(_logprobs, generator, prompt + choice.tokens, first,
                                           self.params.logprobs, start)

        def prefix(self, index: int) -> str:
            return tokenizer.decode(self.job.choices[index].prompt) if self.params.echo else ""

        def usage(self) -> dict:
            prompt = sum(len(p) for p in self.params.prompts)
            completion = sum(len(c.tokens) for c in self.choices)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
            body = {"id": self.id, "object": "text_completion", "created": self.created, "model": served_name,
                    "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        async def collect(self) -> dict:
            async for _ in self.events():
                pass
            if self.unfinished:  # the client went away
                return Response(status_code=499)
            choices = [{"index": i, "text": self.prefix(i) + c.text, "logprobs": await self.logprobs(i),
                        "finish_reason": c.finish_reason, "nvium": self.nvium(c.exits)}
                       for i, c in enumerate(self.choices)]
            return {"id": self.id, "object": "text_completion", "created": self.created, "model": served_name,
                    "choices": choices, "usage": self.usage()}

        async def stream(self):
            sent_exits = [0] * len(self.choices)
            for i in range(len(self.choices)):
                if self.params.echo:
                    yield self.chunk([{"index": i, "text": self.prefix(i), "logprobs": None, "finish_reason": None}])
            async for i, token in self.events():
                choice = self.choices[i]
                text = choice.delta()
                if token is not None and not text:
                    continue  # held back: it may still turn out to be part of a stop string
                exits = choice.exits[sent_exits[i]:]
                sent_exits[i] = len(choice.exits)
                finished = token is None
                yield self.chunk([{"index": i, "text": text,
                                   "logprobs": await self.logprobs(i) if finished else None,
                                   "finish_reason": choice.finish_reason if finished else None,
                                   "nvium": self.nvium(exits)}])
            if self.params.include_usage:
                yield self.chunk([], self.usage())
            yield "data: [DONE]\n\n"

    return app
