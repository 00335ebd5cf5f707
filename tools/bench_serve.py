#!/usr/bin/env python
"""Serving benchmark: open-loop Poisson load on the OpenAI server, N-vium deferred vs full depth vs dense twin.

    python tools/bench_serve.py --synthetic runs/bench_serve                       # writes the exports once
    python tools/bench_serve.py --model exports/tiny --baseline exports/tiny-dense --rates 2,8,32

Starts three servers (tools/serve.py on free 127.0.0.1 ports): the N-vium export with deferred decoding, the
same export at full depth (--mode full), and its parameter-matched dense twin. At each rate (requests per
second) every server gets the same requests: Poisson arrival times, streaming completions of --prompt-tokens
prompt tokens and --max-tokens new tokens with a fixed seed each, so all three decode the same work. A
request is sent at its arrival time whatever is still in flight (open loop); at most --requests requests per
rate and server, none sent after --max-seconds. Prints JSON: tokens/s (generated tokens / time from the
first arrival to the last token), time to first token and inter-token latency p50/p99 (a streamed chunk's
gap split over the tokens it carries), mean rows per engine tick (batch occupancy, from the server's
/metrics) and the server's own speedup-over-full-depth gauge.

--synthetic DIR writes bench_decode's synthetic model (d256, L8, exits 2/4/6, vocab 8000; routers biased so
~70% of tokens take the first exit) and its parameter-matched dense twin as exports DIR/nvium and DIR/dense
(random weights: the numbers measure the serving path, not text quality); an existing pair is reused.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

from nvium_dist.cli import float_above, int_at_least

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="N-vium export directory (with --baseline)")
    source.add_argument("--synthetic", metavar="DIR", help="write (or reuse) the synthetic export pair in DIR")
    p.add_argument("--baseline", help="its parameter-matched dense export (exits: [])")
    p.add_argument("--rates", default="2,8,32", help="comma-separated arrival rates, requests per second")
    p.add_argument("--requests", type=int_at_least(1), default=32, help="requests per rate and server")
    p.add_argument("--max-seconds", type=float_above(0), default=30.0, help="no request is sent later than this")
    p.add_argument("--prompt-tokens", type=int_at_least(1), default=16)
    p.add_argument("--max-tokens", type=int_at_least(1), default=64)
    p.add_argument("--max-batch", type=int_at_least(1), default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anchor", metavar="URL",
                   help="a running OpenAI-compatible server on 127.0.0.1 serving the dense twin as model 'bench' "
                        "(e.g. vLLM on its transformers conversion): a fourth row under the same load")
    return p.parse_args(argv)


def synthetic_exports(directory: str) -> tuple[str, str]:
    """bench_decode's synthetic N-vium model and dense twin, saved as exports (kept if already there)."""
    nvium_dir, dense_dir = os.path.join(directory, "nvium"), os.path.join(directory, "dense")
    if all(os.path.isfile(os.path.join(d, "model.safetensors")) for d in (nvium_dir, dense_dir)):
        return nvium_dir, dense_dir
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench_decode import FIRST_EXIT_RATE, synthetic_models

    from nvium_dist.checkpoint_io import save_export
    from nvium_dist.tp_layout import gather_full_state_dict

    for generator, path in zip(synthetic_models([], FIRST_EXIT_RATE, "cpu"), (nvium_dir, dense_dir)):
        save_export(path, generator.config, gather_full_state_dict(generator.model), None)
    return nvium_dir, dense_dir


def start_server(export: str, mode: str, max_batch: int, requests: int):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--model", export,
                                "--port", "0", "--mode", mode, "--max-batch", str(max_batch),
                                "--max-queue", str(requests), "--served-model-name", "bench"],
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    line = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if not match:
        process.kill()
        raise RuntimeError(f"the server for {export} did not start (see its error above)")
    return process, f"http://127.0.0.1:{match.group(1)}"


def read_metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(nvium_\w+) (\S+)$", text, re.M)}


async def one_request(client, url: str, prompt: list[int], max_tokens: int, seed: int, at: float, start: float):
    """Sends at `at` s after `start`; -> (token arrival times, first-token latency) relative to sending."""
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    sent = time.perf_counter()
    times, counted = [], 0
    # continuous usage stats and ignore_eos: vLLM's names, for the anchor server (nvium's server ignores them)
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "ignore_eos": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if not chunk["choices"]:
                    continue  # the closing usage chunk
                if any("nvium" in c for c in chunk["choices"]):
                    count = sum(len(c["nvium"]["exit_layers"]) for c in chunk["choices"])
                else:  # another server: tokens from the running usage count
                    total = (chunk.get("usage") or {}).get("completion_tokens", counted)
                    count, counted = total - counted, total
                now = time.perf_counter()
                if times and count:  # a chunk that carries several tokens: spread its gap over them
                    gap = (now - times[-1]) / count
                    times += [times[-1] + gap * (i + 1) for i in range(count)]
                else:
                    times += [now] * count
    return sent, times


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def run_load(url: str, prompts, arrivals, max_tokens: int, seed: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        before = read_metrics(url)
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, p, max_tokens, seed + i, at, start)
                                         for i, (p, at) in enumerate(zip(prompts, arrivals))))
        end = max(times[-1] for _, times in results if times)
        after = read_metrics(url)
    ttft, itl = [], []
    for sent, times in results:
        ttft.append(times[0] - sent)
        itl += [b - a for a, b in zip(times, times[1:])]
    tokens = sum(len(times) for _, times in results)
    ticks = after.get("nvium_tick_rows_count", 0) - before.get("nvium_tick_rows_count", 0)
    rows = after.get("nvium_tick_rows_sum", 0) - before.get("nvium_tick_rows_sum", 0)
    ms = lambda v: None if v is None else round(1000 * v, 2)  # noqa: E731
    return {"requests": len(results), "tokens": tokens, "seconds": round(end - start, 3),
            "tokens_per_s": round(tokens / (end - start), 1),
            "ttft_ms_p50": ms(percentile(ttft, 0.5)), "ttft_ms_p99": ms(percentile(ttft, 0.99)),
            "itl_ms_p50": ms(percentile(itl, 0.5)), "itl_ms_p99": ms(percentile(itl, 0.99)),
            "mean_rows_per_tick": round(rows / ticks, 2) if ticks else None,
            "speedup_gauge": (round(after["nvium_speedup_over_full_depth"], 3)
                              if "nvium_speedup_over_full_depth" in after else None)}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",")]
        if not rates or min(rates) <= 0:
            raise ValueError
    except ValueError:
        print(f"error: --rates {args.rates!r} must be comma-separated positive numbers, e.g. 2,8,32", file=sys.stderr)
        return 2
    if args.anchor and not re.fullmatch(r"http://127\.0\.0\.1:\d+", args.anchor):
        print(f"error: --anchor {args.anchor!r} must be http://127.0.0.1:PORT (this benchmark stays on the machine)",
              file=sys.stderr)
        return 2
    if args.model and not args.baseline:
        print("error: --model needs --baseline (the dense twin export); or use --synthetic DIR", file=sys.stderr)
        return 2
    from nvium_dist.checkpoint_io import CheckpointError, load_export

    try:
        model, baseline = synthetic_exports(args.synthetic) if args.synthetic else (args.model, args.baseline)
        config = load_export(model).model_config
        dense_config = load_export(baseline).model_config
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.prompt_tokens + args.max_tokens > min(config.seq_length, dense_config.seq_length):
        print(f"error: --prompt-tokens + --max-tokens exceeds the model context {config.seq_length}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    vocab = min(config.vocab_size, dense_config.vocab_size)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    servers = {}
    try:
        for name, export, mode in (("deferred", model, "deferred"), ("full", model, "full"),
                                   ("dense", baseline, "full")):
            servers[name] = start_server(export, mode, args.max_batch, args.requests)
        urls = {name: url for name, (_, url) in servers.items()}
        if args.anchor:
            urls["anchor"] = args.anchor
        for url in urls.values():
            asyncio.run(run_load(url, prompts[:1], [0.0], 4, args.seed))  # warm-up, not measured
        result = {"model": model, "baseline": baseline, "num_layers": config.num_layers,
                  "exit_layers": config.exit_layers, "hidden_size": config.hidden_size,
                  "max_batch": args.max_batch, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                  "load_average": os.getloadavg(), "rates": []}
        for rate in rates:
            arrivals, at = [], 0.0
            for _ in prompts:
                arrivals.append(at)
                at += rng.expovariate(rate)
            arrivals = [a for a in arrivals if a <= args.max_seconds]
            entry = {"rate": rate}
            for name, url in urls.items():
                print(f"rate {rate}/s: {name}", file=sys.stderr, flush=True)
                entry[name] = asyncio.run(run_load(url, prompts[:len(arrivals)], arrivals, args.max_tokens,
                                                   args.seed))
            entry["deferred_over_dense_tokens_per_s"] = round(
                entry["deferred"]["tokens_per_s"] / entry["dense"]["tokens_per_s"], 3)
            entry["deferred_itl_p50_below_dense"] = entry["deferred"]["itl_ms_p50"] < entry["dense"]["itl_ms_p50"]
            result["rates"].append(entry)
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
        for process, _ in servers.values():
            process.wait()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
