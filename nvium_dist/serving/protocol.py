"""OpenAI's completions request and response shapes: checking a request body, and the JSON errors.

Every bad input is an `APIError` with an HTTP status and OpenAI's error object
    {"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}
so a client sees what was wrong; nothing in a request can make the server answer 500.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from nvium_dist.inference.generator import GenerationError, NviumGenerator
from nvium_dist.inference.sampling import SamplingTransform

MAX_LOGPROBS = 5  # as OpenAI's completions API
MAX_STOP = 4
# parameters of OpenAI's API that this server does not implement: rejected unless left at their neutral value
UNSUPPORTED = {"best_of": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "logit_bias": (None, {}), "suffix": (None, "")}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class CompletionParams:
    prompts: list[list[int]]
    max_tokens: int
    n: int
    seed: int | None
    transform: SamplingTransform | None  # None: exact sampling from p_mix
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool


def parse_json(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(value).__name__}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(value)[:40]}", name)
    if value < low or value > high or (low_open and value == low):
        raise APIError(400, f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default, low: int, high: int, what: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)[:40]}", name)
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low} and {high}{what}, got {value}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false, got {json.dumps(value)[:40]}", name)
    return value


def check_model(body: dict, served_name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, f"'model' must be a string naming the served model ({served_name!r})", "model")
    if model != served_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served_name!r}", "model",
                       "model_not_found")


def _prompts(body: dict, generator: NviumGenerator) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists -> token-id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string, list of strings, list of token ids or list of "
                            "token-id lists", "prompt")
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            try:
                prompts.append(generator.tokenizer.encode(item))
            except GenerationError as err:  # an export without a tokenizer takes token ids only
                raise APIError(400, str(err), "prompt") from None
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            prompts.append(item)
        else:
            raise APIError(400, "'prompt' must be a non-empty string, list of strings, list of token ids or list "
                                "of token-id lists", "prompt")
    return prompts


def parse_completion(body: dict, generator: NviumGenerator, max_n: int) -> CompletionParams:
    for name, neutral in UNSUPPORTED.items():
        if body.get(name, None) not in neutral:
            raise APIError(400, f"'{name}' is not supported by this server", name)
    context = generator.config.seq_length
    prompts = _prompts(body, generator)
    max_tokens = _integer(body, "max_tokens", 16, 0, context, f" (the model context is {context} tokens)")
    try:
        prompts, _ = generator.prepare_prompts(prompts, max_tokens)
    except GenerationError as err:
        message = str(err)
        raise APIError(400, message.replace("max_new_tokens", "max_tokens"),
                       "max_tokens" if "max_new_tokens" in message else "prompt") from None
    n = _integer(body, "n", 1, 1, max_n, " (this server's --max-n)")
    seed = _integer(body, "seed", None, -(1 << 63), (1 << 64) - 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0, -1, generator.config.vocab_size)
    transform = SamplingTransform(max(temperature, 1e-6), max(top_k, 0), top_p, greedy=temperature == 0)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)):
        raise APIError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    return CompletionParams(
        prompts, max_tokens, n, seed, None if transform.is_identity else transform, stop, _flag(body, "stream"),
        bool((options or {}).get("include_usage", False)), _integer(body, "logprobs", None, 0, MAX_LOGPROBS),
        _flag(body, "echo"))
