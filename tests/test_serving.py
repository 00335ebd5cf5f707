"""The OpenAI-compatible server as users run it: a real server process on a free 127.0.0.1 port, driven by the
real `openai` client (and raw HTTP for what the client cannot send), checked against NviumGenerator.generate."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from test_inference import make_export, one_thread  # noqa: F401 (autouse fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
CONTEXT = 4096  # long enough that 4 rows stay busy while a test fills the queue
PROMPTS = ["ROMEO: ", "Enter KING HENRY", "a", "What light through yonder window"]


def start_server(export, *args):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--model", str(export),
                                "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": ROOT})
    line = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if not match:
        process.kill()
        raise AssertionError(f"server did not start: {line!r} {process.stderr.read()[-2000:]}")
    url = f"http://127.0.0.1:{match.group(1)}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("server never became healthy")


def stop_server(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("serving") / "tiny", vocab_size=256, seq_length=CONTEXT)


@pytest.fixture(scope="module")
def generator(export):
    from nvium_dist.inference import NviumGenerator

    return NviumGenerator.from_pretrained(export)


@pytest.fixture(scope="module")
def server(export):
    process, url = start_server(export, "--max-batch", "4", "--max-queue", "4", "--max-n", "4", "--api-key", KEY)
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def metric(url, name) -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1))


def expected(generator, prompts, max_tokens, seed, **kwargs):
    out = generator.generate(prompts, max_tokens, seed=seed, **kwargs)
    tok = generator.tokenizer
    layers = generator.config.exit_layers
    return [(tok.decode(t), [layers[e] if e >= 0 else None for e in x]) for t, x in zip(out.tokens, out.exits)]


def test_completion_equals_generate_with_its_seed(client, generator):
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, seed=5)
    (text, layers), = expected(generator, [PROMPTS[0]], 24, 5)
    choice = out.choices[0]
    assert choice.text == text and choice.finish_reason == "length"
    assert choice.nvium == {"path": "deferred", "exit_layers": layers}
    assert len(set(layers)) > 1  # tokens really left at different exits
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(PROMPTS[0]), 24)
    # several prompts, n choices each: choice i is sequence i of generate with the request's seed
    out = client.completions.create(model="tiny", prompt=PROMPTS[:2], n=2, max_tokens=10, seed=9)
    want = expected(generator, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, 10, 9)
    assert [(c.text, c.nvium["exit_layers"]) for c in out.choices] == want
    assert out.usage.completion_tokens == 40
    ids = generator.tokenizer.encode(PROMPTS[1])
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=8, seed=9)
    assert out.choices[0].text == expected(generator, [ids], 8, 9)[0][0]


def test_transformed_sampling_runs_the_full_mixture(client, generator):
    out = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=12, seed=4, temperature=0.7,
                                    extra_body={"top_k": 5})
    (text, _), = expected(generator, [PROMPTS[3]], 12, 4, mode="full", temperature=0.7, top_k=5)
    assert out.choices[0].text == text
    assert out.choices[0].nvium == {"path": "full-transformed", "exit_layers": [None] * 12}
    greedy = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=6, temperature=0)
    assert greedy.choices[0].text == expected(generator, [PROMPTS[3]], 6, 0, mode="full", greedy=True)[0][0]


def test_streaming_sends_the_same_tokens(client, generator):
    (text, layers), = expected(generator, [PROMPTS[1]], 30, 21)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=30, seed=21, stream=True,
                                            stream_options={"include_usage": True}))
    assert len(chunks) > 3  # token by token, not one blob
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [layer for c in chunks if c.choices for layer in c.choices[0].nvium["exit_layers"]] == layers
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 30


def test_stop_logprobs_and_echo(client, generator):
    (text, _), = expected(generator, [PROMPTS[0]], 40, 2)
    stop = text[10:13]
    cut = text[:text.find(stop)]
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, seed=2, stop=[stop])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, seed=2, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut

    out = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=6, seed=3, logprobs=2, echo=True)
    choice = out.choices[0]
    sequence = generator.tokenizer.encode(PROMPTS[2]) + generator.generate([PROMPTS[2]], 6, seed=3).tokens[0]
    log_mix = generator.mixture_logprobs(sequence)
    want = [None] + [log_mix[p - 1, sequence[p]].item() for p in range(1, len(sequence))]
    assert choice.text.startswith(PROMPTS[2]) and len(choice.logprobs.token_logprobs) == len(sequence)
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])


def test_sixteen_concurrent_clients_get_their_seeded_tokens(server, client, generator):
    """16 clients against 4 rows and a queue of 4: requests join rows as others leave (or get 429 and retry),
    and each gets generate's tokens for its seed whatever else shared its ticks."""
    results, errors = {}, []
    before = (metric(server, "nvium_tick_rows_sum"), metric(server, "nvium_tick_rows_count"))

    def run(i):
        try:
            own = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=20, timeout=120)
            out = own.completions.create(model="tiny", prompt=PROMPTS[i % 4], max_tokens=16 + i, seed=100 + i)
            results[i] = out.choices[0].text
        except Exception as err:  # reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(16):
        assert results[i] == expected(generator, [PROMPTS[i % 4]], 16 + i, 100 + i)[0][0], i
    rows = metric(server, "nvium_tick_rows_sum") - before[0]
    ticks = metric(server, "nvium_tick_rows_count") - before[1]
    assert rows / ticks > 1.5  # requests really shared ticks
    assert metric(server, "nvium_active_rows") == 0 and metric(server, "nvium_queue_depth") == 0


def _open_stream(url, max_tokens=CONTEXT - 10, seed=0, stream=True):
    """A raw completion request (streaming by default); returns its socket."""
    body = json.dumps({"model": "tiny", "prompt": "x" * 4, "max_tokens": max_tokens, "seed": seed,
                       "stream": stream}).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _wait_metric(url, name, value, timeout=60):
    deadline = time.time() + timeout
    while metric(url, name) != value:
        assert time.time() < deadline, (name, metric(url, name), httpx.get(url + "/metrics").text[-3000:])
        time.sleep(0.01)


def _wait_idle(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metric(url, "nvium_active_rows") == 0 and metric(url, "nvium_queue_depth") == 0:
            return
        time.sleep(0.02)
    raise AssertionError("rows or queue still busy")


def _disconnects(url, client, generator, count):
    tokens = metric(url, "nvium_generated_tokens_total")
    rss = metric(url, "process_resident_memory_bytes")
    for i in range(count):
        if i % 8 == 7:  # a client that gives up waiting for a whole (non-streamed) completion
            sock = _open_stream(url, seed=i, stream=False)
            time.sleep(0.05)
        else:
            sock = _open_stream(url, seed=i)
            assert b"data:" in sock.recv(65536) or b"data:" in sock.recv(65536)
        sock.close()
        if i % 16 == 15:
            _wait_idle(url)
    _wait_idle(url)
    generated = metric(url, "nvium_generated_tokens_total") - tokens
    assert generated < count * (CONTEXT - 10) / 4  # the rows stopped long before their max_tokens
    assert metric(url, "process_resident_memory_bytes") - rss < 64 << 20
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, seed=8)
    assert out.choices[0].text == expected(generator, [PROMPTS[0]], 10, 8)[0][0]


def test_disconnects_free_their_rows(server, client, generator):
    _disconnects(server, client, generator, 48)


@pytest.mark.slow
def test_thousand_disconnects_leave_no_leak(server, client, generator):
    _disconnects(server, client, generator, 1000)


def test_full_queue_answers_429_with_retry_after(server):
    socks = [_open_stream(server, seed=i) for i in range(4)]
    try:
        _wait_metric(server, "nvium_active_rows", 4)  # each of the 4 rows is decoding
        socks += [_open_stream(server, seed=10 + i) for i in range(4)]
        _wait_metric(server, "nvium_queue_depth", 4)
        response = httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
    finally:
        for sock in socks:
            sock.close()
    _wait_idle(server)


BAD = [
    ("malformed JSON", b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    ("not an object", [1, 2], 400, "JSON object"),
    ("wrong type", {"prompt": "a", "max_tokens": "5"}, 400, "'max_tokens' must be an integer"),
    ("wrong type bool", {"prompt": "a", "stream": "yes"}, 400, "'stream' must be true or false"),
    ("wrong type number", {"prompt": "a", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("unknown model", {"model": "gpt-4", "prompt": "a"}, 404, "does not exist"),
    ("missing model", {"model": None, "prompt": "a"}, 400, "'model' must be a string"),
    ("empty prompt", {"prompt": ""}, 400, "empty"),
    ("empty prompt list", {"prompt": []}, 400, "non-empty"),
    ("prompt longer than context", {"prompt": "a" * (CONTEXT + 1)}, 400, "longer than the model context"),
    ("max_tokens past context", {"prompt": "a" * (CONTEXT - 10), "max_tokens": 20}, 400, "exceeds the model context"),
    ("max_tokens above limit", {"prompt": "a", "max_tokens": CONTEXT + 1}, 400, "'max_tokens' must be between"),
    ("token ids out of range", {"prompt": [1, 2, 256]}, 400, "outside the vocabulary"),
    ("negative token id", {"prompt": [[3, -1]]}, 400, "outside the vocabulary"),
    ("n above limit", {"prompt": "a", "n": 5}, 400, "'n' must be between 1 and 4"),
    ("top_p out of range", {"prompt": "a", "top_p": 0}, 400, "'top_p' must be in"),
    ("bad stop", {"prompt": "a", "stop": [""]}, 400, "'stop'"),
    ("logprobs above limit", {"prompt": "a", "logprobs": 6}, 400, "'logprobs'"),
    ("unsupported parameter", {"prompt": "a", "presence_penalty": 1.0}, 400, "not supported"),
    ("oversize body", {"prompt": "a" * (1 << 20)}, 413, "exceeds"),
]


@pytest.mark.parametrize("body,status,message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_an_openai_error(server, client, body, status, message):
    if isinstance(body, dict):
        body = json.dumps({"model": "tiny", **body}).encode()
    elif not isinstance(body, bytes):
        body = json.dumps(body).encode()
    response = httpx.post(server + "/v1/completions", content=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"]
    assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text is not None


def test_auth_chat_models_and_routes(server, client):
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt="a", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert [m.id for m in client.models.list()] == ["tiny"]
    missing = httpx.get(server + "/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    text = httpx.get(server + "/metrics").text
    for name in ("nvium_requests_total", "nvium_queue_depth", "nvium_batch_occupancy",
                 "nvium_time_to_first_token_seconds_bucket", "nvium_inter_token_latency_seconds_bucket",
                 "nvium_exit_layer_bucket", "nvium_mean_exit_layer", "nvium_speedup_over_full_depth"):
        assert name in text, name
    assert metric(server, "nvium_speedup_over_full_depth") > 1.0  # deferred tokens read fewer layers


def test_sigterm_finishes_in_flight_requests_and_exits_0(export):
    process, url = start_server(export, "--grace-period", "60")
    try:
        sock = _open_stream(url, max_tokens=200)
        received = sock.recv(65536)
        process.send_signal(signal.SIGTERM)
        while b"data: [DONE]" not in received:
            data = sock.recv(65536)
            assert data, "stream cut before [DONE]"
            received += data
        sock.close()
        assert received.count(b'"finish_reason": "length"') == 1
        assert process.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_bench_serve_compares_three_servers(tmp_path, export):
    dense = make_export(tmp_path / "dense", vocab_size=256, seq_length=CONTEXT, exits=[])
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_serve.py"), "--model", str(export),
                           "--baseline", str(dense), "--rates", "50", "--requests", "4", "--max-tokens", "8"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    entry, = result["rates"]
    for name in ("deferred", "full", "dense"):
        assert entry[name]["tokens"] == 32 and entry[name]["itl_ms_p50"] > 0
    assert entry["full"]["speedup_gauge"] == 1.0 and entry["deferred"]["speedup_gauge"] > 1.0


def test_port_in_use_is_one_error_line(tmp_path, server):
    """(Other bad arguments of serve.py and bench_serve.py are cases of tests/test_cli_errors.py.)"""
    port = server.rsplit(":", 1)[1]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--model", str(tmp_path),
                           "--port", port], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=120)
    assert done.returncode == 2 and "cannot listen" in done.stderr and "Traceback" not in done.stderr, done.stderr
