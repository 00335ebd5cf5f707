#!/usr/bin/env python
"""Decoding throughput of N-vium, side by side, as JSON: dense twin, full depth, deferred, deferred in lockstep.

    python tools/bench_decode.py --synthetic                      # the benchmark model, built in memory
    python tools/bench_decode.py --model exports/tiny --baseline exports/tiny-dense
    python tools/bench_decode.py --synthetic --profile            # + where batch-1 time goes, per token
    python tools/bench_decode.py --synthetic --device cuda --batch-sizes 1 --continuous '' --cuda-graphs

--synthetic builds the issue-14 benchmark model (d256, L8, 4 heads, exits after layers 2/4/6, vocab 8000,
random weights; routers biased so ~70% of tokens take the first exit and half of the rest each later one)
and its parameter-matched dense twin, so anyone can rerun the numbers without an export; `--set key=value`
changes its ModelConfig (e.g. --set hidden_size=64).

For every setting (batch sizes 1, 4, 16 by default, each decoding batches of prompts one after another until
--min-tokens tokens, plus --continuous ROWS:PROMPTS: more prompts than rows, with per-prompt lengths between
1/2 and 3/2 of --new-tokens, entering rows as they free up) the same prompts and seed are decoded by
    dense               the dense twin (--baseline), full depth
    full                N-vium, every layer every step (mode="full")
    deferred            N-vium, each token only up to its sampled exit, rows advancing independently
    deferred_lockstep   the same with every tick completing every current token (a lockstep batch)
interleaved in a rotating order inside each of --repeats rounds, so load changes hit all alike; the JSON
gives the median tokens/s (and the best) and the median tokens per CPU second of the process. Speedups,
efficiencies, call-cost fits and the profile use one clock (--clock): on CPU by default the process's CPU
time, which with one thread leaves out the time it waited for a core while other jobs ran (the main noise
on a shared machine); wall time on CUDA. All three N-vium decoders draw the same tokens (checked).

Next to the measured deferred speedup over full depth, one bound and three models (a model is an estimate
the measurement may exceed, e.g. because a batched catch-up call costs less per token than a single-token
call, or because full depth also pays for heads the deferred decoder skips):
    upper_segments_free_bound  a bound: from one profiled full-depth and one profiled deferred run of the
                     setting, full time / (deferred time minus all its calls of segments above the first),
                     i.e. the speedup if every layer above the first exit cost nothing. profiled_speedup (the
                     same two runs) never exceeds it; the timed speedup is from other runs and can, by noise.
    ideal_speedup    model: L / E[exit layer] (sequential depth per token)
    lockstep_ideal   model: L / E[deepest exit layer of a tick] for a lockstep batch (deferred_lockstep's ticks)
    work_model       model: every token still passes every layer, so at larger batches the step time grows
                     with the tokens run: the full-depth run's time with the fixed cost of every call of a
                     segment above the first removed (calls fitted as fixed + per-token cost from the profiled
                     runs), what a scheduler would reach if cost were proportional to work.
efficiency = measured speedup / ideal; efficiency_vs_work_model = measured / min(ideal, work model).
When the routers send more than 95% of the tokens to one exit, a warning prints the exit histogram: the
speedup then describes a shallower model, not N-vium. Load averages are recorded per setting: on a shared
machine numbers move by tens of percent; rerun on a quiet one. On CUDA the JSON also counts the host's waits
for the GPU per generated token at batch 1 (host_syncs_per_token_batch1): deferred, one per exit decision that
reaches a router and one for the tick's sampled tokens is the floor, since the next segment to run depends on
both; full depth decides on the device and reads back once per token.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

from nvium_dist.cli import int_at_least, int_list, torch_setup_error

FIRST_EXIT_RATE = 0.7
SYNTHETIC = dict(vocab_size=8000, hidden_size=256, num_layers=8, num_heads=4, ffn_hidden_size=688, exits=[2, 4, 6],
                 seq_length=512)
DECODERS = ("dense", "full", "deferred", "deferred_lockstep")
COLLAPSED_SHARE = 0.95  # routing this much to one exit is warned about


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="N-vium export directory")
    source.add_argument("--synthetic", action="store_true", help="build the benchmark model and its dense twin")
    p.add_argument("--baseline", help="dense export directory (exits: []) to compare with (--model only)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="--synthetic: override a ModelConfig field (repeatable)")
    p.add_argument("--first-exit-rate", type=float, default=FIRST_EXIT_RATE,
                   help="--synthetic: share of tokens the routers send out at the first exit")
    p.add_argument("--batch-sizes", type=int_list(1), default="1,4,16", help="comma-separated batch sizes")
    p.add_argument("--continuous", default="16:48", help="ROWS:PROMPTS continuous-batching setting ('' = none)")
    p.add_argument("--new-tokens", type=int_at_least(1), default=64, help="tokens generated per sequence")
    p.add_argument("--min-tokens", type=int_at_least(0), default=256,
                   help="a batch size decodes batches of prompts one after another until this many tokens")
    p.add_argument("--prompt-tokens", type=int_at_least(1), default=16, help="prompt length per sequence")
    p.add_argument("--repeats", type=int_at_least(1), default=5,
                   help="interleaved rounds per setting (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_at_least(0), default=1,
                   help="torch CPU threads (default 1: small-batch decoding is latency bound; 0 = torch default)")
    p.add_argument("--profile", action="store_true", help="also report where batch-1 time goes, per token")
    p.add_argument("--clock", choices=["cpu", "wall"],
                   help="time for speedups, fits and the profile: this process's CPU time (default on CPU: leaves out "
                        "waiting for a core on a shared machine; meant for one thread) or wall time (default on CUDA)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile (dynamic shapes) every layer's MLP of both models before timing; the compile "
                        "happens in the warm-up (on this 2-core CPU it made decoding slower: docs/performance.md)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --device cuda at batch 1 (--batch-sizes 1 --continuous ''): every decoder replays its "
                        "single-token segment calls as CUDA graphs (nvium_dist/inference/graphs.py)")
    return p.parse_args(argv)


class BenchError(ValueError):
    """Bad benchmark input; main() prints it as one line."""


def parse_settings(batch_sizes: list[int], continuous: str, min_tokens: int, new_tokens: int
                   ) -> list[tuple[int, int, bool]]:
    """-> [(rows, prompts, serving)]: one per batch size (enough prompts, decoded one batch after another, for
    at least `min_tokens` tokens), then the continuous-batching (serving) setting."""
    settings = [(b, max(b, b * math.ceil(min_tokens / (b * new_tokens))), False) for b in batch_sizes]
    try:
        if continuous:
            rows, prompts = (int(x) for x in continuous.split(":"))
            if not 1 <= rows <= prompts:
                raise BenchError("--continuous needs PROMPTS >= ROWS >= 1")
            settings.append((rows, prompts, True))
    except ValueError as err:
        if isinstance(err, BenchError):
            raise
        raise BenchError(f"--continuous {continuous!r} must be ROWS:PROMPTS") from None
    return settings


def synthetic_models(overrides: list[str], first_exit_rate: float, device: str, seed: int = 0):
    """The benchmark N-vium model and its parameter-matched dense twin as generators (random weights)."""
    import dataclasses

    import torch

    from nvium_dist.config import ConfigError, ModelConfig, model_config_from_dict
    from nvium_dist.inference.generator import NviumGenerator, Tokenizer, ensure_process_group
    from nvium_dist.model import NviumModel
    from nvium_dist.model_info import dense_twin, matched_dense_ffn

    values = dict(SYNTHETIC)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise BenchError(f"--set {item!r}: expected KEY=VALUE with KEY a model config field")
        values[key] = json.loads(value) if value[:1] in "[0123456789-" else value
    if not 0.0 < first_exit_rate < 1.0:
        raise BenchError(f"--first-exit-rate must be in (0, 1), got {first_exit_rate}")
    try:
        config = model_config_from_dict(values)
        config.validate()
    except (ConfigError, TypeError, ValueError) as err:
        raise BenchError(f"synthetic model: {err}") from None
    ensure_process_group(device)
    generators = []
    for cfg in (config, dense_twin(config, matched_dense_ffn(config))):
        model = NviumModel(cfg, seed=seed)
        with torch.no_grad():
            for k, head in enumerate(model.heads[:-1]):
                rate = first_exit_rate if k == 0 else 0.5
                head.router.logits.bias.copy_(torch.tensor([0.0, math.log(rate / (1 - rate))]))
        model = model.to(device).eval()
        for param in model.parameters():
            param.requires_grad_(False)
        generators.append(NviumGenerator(model, Tokenizer("none", None), device=device))
    return generators


def make_prompts(generator, count: int, length: int, seed: int) -> list[list[int]]:
    """Text prompts when the export has a tokenizer (CPython's bundled pydoc topics), else random ids."""
    text = ""
    if generator.tokenizer.kind != "none":
        try:
            from pydoc_data import topics

            text = "\n".join(topics.topics.values())
        except ImportError:
            text = ""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        if text:
            start = rng.randrange(0, len(text) - 40 * length)
            ids = generator.tokenizer.encode(text[start:start + 40 * length])[:length]
        else:
            ids = [rng.randrange(generator.config.vocab_size) for _ in range(length)]
        prompts.append(ids)
    return prompts


def lockstep_ideal(tick_depths: list[int], num_layers: int) -> float:
    """L / mean deepest exit layer per tick of a lockstep batch."""
    return num_layers / (sum(tick_depths) / len(tick_depths))


def fit_call_costs(calls: list[tuple[int, int, float]], num_segments: int) -> list[tuple[float, float]]:
    """Per segment (fixed seconds per call, seconds per token) from (segment, tokens, seconds) samples, robust to
    load spikes: the median time of each token count, then the median of the pairwise slopes between those
    points (Theil-Sen); the fixed part is at most the median time of the smallest calls."""
    fits = []
    for j in range(num_segments):
        by_count: dict[int, list[float]] = {}
        for segment, tokens, seconds in calls:
            if segment == j:
                by_count.setdefault(tokens, []).append(seconds)
        points = sorted((n, statistics.median(ts)) for n, ts in by_count.items())
        if not points:
            fits.append((0.0, 0.0))
            continue
        slopes = [(t2 - t1) / (n2 - n1) for i, (n1, t1) in enumerate(points) for n2, t2 in points[i + 1:]]
        slope = max(0.0, statistics.median(slopes)) if slopes else 0.0
        fixed = statistics.median(t - slope * n for n, t in points)
        fits.append((min(max(0.0, fixed), points[0][1]), slope))
    return fits


def run_setting(runs: dict, rows: int, seed: int, repeats: int, sync) -> dict:
    """runs: {name: (generator, prompts, limits, generate kwargs)}. Interleaved timed runs, rotating the order
    each round -> {name: ({"wall": seconds list, "cpu": CPU seconds list}, (last output, tick depths))}; tick
    depths are recorded for the lockstep decoder (the deepest exit layer among the tokens of each tick)."""
    names = [n for n in DECODERS if n in runs]
    for generator, prompts, limits, kwargs in runs.values():
        generator.generate(prompts, [min(8, n) for n in limits], seed=seed, max_batch=rows, **kwargs)
    seconds = {name: {"wall": [], "cpu": []} for name in names}
    outputs = {}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            generator, prompts, limits, kwargs = runs[name]
            depths: list[int] = []
            layers = generator.config.exit_layers
            on_step = (lambda tick, sampled: depths.append(max(layers[e] for _, e in sampled.values()))) \
                if name == "deferred_lockstep" else None
            sync()
            cpu = time.process_time()
            out = generator.generate(prompts, limits, seed=seed, max_batch=rows, on_step=on_step, **kwargs)
            sync()
            seconds[name]["cpu"].append(time.process_time() - cpu)
            seconds[name]["wall"].append(out.seconds)
            outputs[name] = (out, depths)
    return {name: (seconds[name], outputs[name]) for name in names}


def profiled_run(generator, prompts, limits, rows, seed, mode, schedule, cuda, clock, options):
    """-> (profiler, output, seconds of the run by `clock`); options: more generate() arguments."""
    from nvium_dist.inference.profile import TickProfiler

    profiler = TickProfiler(cuda, clock)
    start = clock()
    out = generator.generate(prompts, limits, seed=seed, max_batch=rows, mode=mode, schedule=schedule,
                             timer=profiler, **options)
    return profiler, out, clock() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        settings = parse_settings(args.batch_sizes, args.continuous, args.min_tokens, args.new_tokens)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    error = torch_setup_error(args.device, args.threads)
    if error:
        print(error, file=sys.stderr)
        return 2
    if args.cuda_graphs and (args.device != "cuda" or any(rows != 1 for rows, _, _ in settings)):
        print("error: --cuda-graphs needs --device cuda and batch 1 only (--batch-sizes 1 --continuous '')",
              file=sys.stderr)
        return 2
    if args.baseline and args.synthetic:
        print("error: --baseline goes with --model (--synthetic builds its own dense twin)", file=sys.stderr)
        return 2

    import torch

    from nvium_dist.checkpoint_io import CheckpointError
    from nvium_dist.inference import GenerationError, NviumGenerator
    from nvium_dist.inference.engine import TickSchedule

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock_name = args.clock or ("wall" if cuda else "cpu")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    try:
        if args.synthetic:
            nvium, dense = synthetic_models(args.set, args.first_exit_rate, args.device, args.seed)
        else:
            nvium = NviumGenerator.from_pretrained(args.model, device=args.device)
            dense = NviumGenerator.from_pretrained(args.baseline, device=args.device) if args.baseline else None
    except (CheckpointError, BenchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.compile:
        for generator in filter(None, (nvium, dense)):
            for block in generator.model.layers:
                block.mlp.compile(dynamic=True)
    if dense is not None and dense.config.exits:
        print(f"warning: --baseline {args.baseline} has exits {dense.config.exits}; it is timed at full depth",
              file=sys.stderr)
    config = nvium.config
    if args.prompt_tokens + (3 * args.new_tokens + 1) // 2 > config.seq_length:
        print(f"error: --prompt-tokens + 1.5 x --new-tokens exceeds the model context {config.seq_length}",
              file=sys.stderr)
        return 2
    num_layers = config.num_layers
    result = {"model": "synthetic" if args.synthetic else args.model, "baseline": args.baseline,
              "num_layers": num_layers, "exit_layers": config.exit_layers, "hidden_size": config.hidden_size,
              "vocab_size": config.vocab_size, "threads": torch.get_num_threads(), "device": args.device,
              "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
              "clock": clock_name, "compiled_mlps": args.compile, "cuda_graphs": args.cuda_graphs, "settings": []}
    options = {"fixed_shape_calls": True} if args.cuda_graphs else {}
    try:
        for rows, count, serving in settings:
            load_before = os.getloadavg()
            prompts = make_prompts(nvium, count, args.prompt_tokens, args.seed + count)
            if dense is not None and dense.config.vocab_size < config.vocab_size:
                dense_prompts = [[t % dense.config.vocab_size for t in p] for p in prompts]
            else:
                dense_prompts = prompts
            if not serving:
                limits = [args.new_tokens] * count
            else:  # serving-like: lengths vary, so rows free up at different times
                rng = random.Random(args.seed)
                limits = [rng.randint(args.new_tokens // 2, (3 * args.new_tokens) // 2) for _ in range(count)]
            label = f"{count} prompts through {rows} rows" if serving else f"batch {rows}"
            print(f"{label}: timing", file=sys.stderr, flush=True)
            runs = {"full": (nvium, prompts, limits, dict(mode="full", **options)),
                    "deferred": (nvium, prompts, limits, dict(mode="deferred", schedule=TickSchedule(), **options)),
                    "deferred_lockstep": (nvium, prompts, limits, dict(mode="deferred", schedule=None, **options))}
            if dense is not None:
                runs["dense"] = (dense, dense_prompts, limits, dict(mode="full", **options))
            timed = run_setting(runs, rows, args.seed, args.repeats, sync)
            calls, profiled = [], {}  # segment call timings of this setting, for its work model and bound
            for mode, schedule in (("full", None), ("deferred", TickSchedule())):
                profiler, _, seconds = profiled_run(nvium, prompts, limits, rows, args.seed, mode, schedule, cuda,
                                                    clock, options)
                calls += profiler.calls
                profiled[mode] = (seconds, sum(t for segment, _, t in profiler.calls if segment > 0))
            costs = fit_call_costs(calls, config.num_heads_total)
            entry = summarize(rows, count, serving, timed, costs, num_layers, clock_name, load_before,
                              os.getloadavg())
            entry.update(profiled_bound(profiled))
            warn_if_collapsed(label, entry["exit_histogram"], config.exit_layers)
            result["settings"].append(entry)
            if not entry["same_tokens"]:
                print("warning: full and deferred tokens differ (a floating-point tie at a sampling boundary)",
                      file=sys.stderr)
            tps = entry["tokens_per_s"] if clock_name == "wall" else entry["tokens_per_cpu_s"]
            unit = "tok/s" if clock_name == "wall" else "tok/CPU-s"
            print(f"{label}: full {tps['full']:.0f} {unit}, deferred {tps['deferred']:.0f} ({entry['speedup']:.2f}x; "
                  f"ideal {entry['ideal_speedup']:.2f}x, lockstep ideal {entry['lockstep_ideal']:.2f}x, work model "
                  f"{entry['work_model']:.2f}x, bound {entry['upper_segments_free_bound']:.2f}x)"
                  + (f", dense {tps['dense']:.0f}" if "dense" in tps else ""), file=sys.stderr, flush=True)
        if args.profile:
            result["profile_batch1"] = profile_batch1(nvium, args, cuda, clock, options)
        if cuda:
            result["host_syncs_per_token_batch1"] = host_syncs_per_token(nvium, args, options)
    except GenerationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def summarize(rows, count, serving, timed, costs, num_layers, clock, load_before, load_after) -> dict:
    """Speedups, bounds and efficiencies by `clock` ("cpu" or "wall"); tokens/s by both."""
    tokens = timed["full"][1][0].num_tokens
    per_second = {c: {name: tokens / statistics.median(s[c]) for name, (s, _) in timed.items()}
                  for c in ("wall", "cpu")}
    best = {name: tokens / min(s["wall"]) for name, (s, _) in timed.items()}
    median = per_second[clock]
    full_out = timed["full"][1][0]
    deferred_out = timed["deferred"][1][0]
    lockstep_out, depths = timed["deferred_lockstep"][1]
    mean_layer = deferred_out.mean_exit_layer()
    ideal = num_layers / mean_layer
    speedup = median["deferred"] / median["full"]
    # the full-depth run calls every segment once per tick; remove the fixed cost of the upper ones
    full_seconds = statistics.median(timed["full"][0][clock])
    upper_fixed = full_out.ticks * sum(a for a, _ in costs[1:])
    work = full_seconds / max(full_seconds - upper_fixed, 1e-9)
    model = min(ideal, work)
    entry = {"rows": rows, "prompts": count, "serving": serving, "generated_tokens": tokens,
             "segment_call_cost_us": [{"fixed": round(1e6 * a, 1), "per_token": round(1e6 * b, 2)} for a, b in costs],
             "tokens_per_s": {k: round(v, 1) for k, v in per_second["wall"].items()},
             "tokens_per_s_best": {k: round(v, 1) for k, v in best.items()},
             "tokens_per_cpu_s": {k: round(v, 1) for k, v in per_second["cpu"].items()},
             "speedup": round(speedup, 3),
             "speedup_lockstep": round(median["deferred_lockstep"] / median["full"], 3),
             "ideal_speedup": round(ideal, 3),
             "lockstep_ideal": round(lockstep_ideal(depths, num_layers), 3),
             "work_model": round(work, 3),
             "efficiency": round(speedup / ideal, 3),
             "efficiency_vs_work_model": round(speedup / model, 3),
             "beats_lockstep_ideal": speedup > lockstep_ideal(depths, num_layers),
             "mean_exit_layer": round(mean_layer, 3), "exit_histogram": deferred_out.exit_histogram(),
             "ticks": {"full": full_out.ticks, "deferred": deferred_out.ticks, "deferred_lockstep": lockstep_out.ticks},
             "segment_calls": {name: out.engine.segment_calls for name, out in
                               (("deferred", deferred_out), ("deferred_lockstep", lockstep_out))},
             "tokens_per_call": {name: [round(t / max(c, 1), 2) for t, c in
                                        zip(out.engine.segment_tokens, out.engine.segment_calls)]
                                 for name, out in (("deferred", deferred_out), ("deferred_lockstep", lockstep_out))},
             "same_tokens": full_out.tokens == deferred_out.tokens == lockstep_out.tokens,
             "load_average": {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in load_after]}}
    if "dense" in median:
        entry["speedup_vs_dense"] = round(median["deferred"] / median["dense"], 3)
    return entry


def profiled_bound(profiled: dict) -> dict:
    """profiled: {"full"/"deferred": (seconds of one profiled run, seconds of its calls of segments >= 1)} ->
    the speedup of those two runs and its bound if every segment above the first were free: the deferred run
    spends at least its other time, so the first can never exceed the second."""
    (full, _), (deferred, upper) = profiled["full"], profiled["deferred"]
    return {"profiled_speedup": round(full / deferred, 3),
            "upper_segments_free_bound": round(full / max(deferred - upper, 1e-12), 3)}


def warn_if_collapsed(label: str, histogram: list[int], exit_layers: list[int]) -> None:
    """A warning (stderr) when the routers send more than COLLAPSED_SHARE of the tokens to one exit."""
    share = max(histogram) / max(1, sum(histogram))
    if share > COLLAPSED_SHARE:
        top = histogram.index(max(histogram))
        print(f"warning: {label}: the routers send {100 * share:.1f}% of tokens to the exit after layer "
              f"{exit_layers[top]} (exit histogram {histogram} over layers {exit_layers}); the speedup describes "
              "that shallower model, not N-vium", file=sys.stderr)


def host_syncs_per_token(nvium, args, options) -> dict:
    """CUDA: the calls that made the host wait for the GPU (torch.cuda.set_sync_debug_mode's warnings) per
    generated token of one batch-1 sequence, full depth and deferred."""
    import warnings

    import torch

    from nvium_dist.inference.engine import TickSchedule

    prompts = make_prompts(nvium, 1, args.prompt_tokens, args.seed + 1)
    counts = {}
    for mode, schedule in (("full", None), ("deferred", TickSchedule())):
        nvium.generate(prompts, [4], seed=args.seed, mode=mode, schedule=schedule, **options)  # graphs captured
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = nvium.generate(prompts, [args.new_tokens], seed=args.seed, mode=mode, schedule=schedule,
                                     **options)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        counts[mode] = round(syncs / out.num_tokens, 2)
    return counts


def profile_batch1(nvium, args, cuda, clock, options) -> dict:
    """Microseconds per generated token by part, by `clock` (median of --repeats profiled runs, full depth and
    deferred alternating), with a model of what the heads leave (heads_model, not a bound): the full-depth time
    with its layers scaled by E[exit layer] / L and its routers by the exits actually reached."""
    from nvium_dist.inference.engine import TickSchedule

    prompts = make_prompts(nvium, 1, args.prompt_tokens, args.seed + 1)
    parts = {"full": {}, "deferred": {}}
    histogram = None
    for _ in range(args.repeats):
        for mode, schedule in (("full", None), ("deferred", TickSchedule())):
            profiler, out, seconds = profiled_run(nvium, prompts, [args.new_tokens], 1, args.seed, mode, schedule,
                                                  cuda, clock, options)
            for name, us in profiler.report(out.num_tokens, seconds).items():
                parts[mode].setdefault(name, []).append(us)
            histogram = out.exit_histogram()
    report = {mode: {name: round(statistics.median(v), 1) for name, v in values.items()}
              for mode, values in parts.items()}
    full, layers = report["full"], nvium.config.exit_layers
    mean_layer = sum(c * layer for c, layer in zip(histogram, layers)) / sum(histogram)
    segments = sum(v for k, v in full.items() if k.startswith("segment"))
    routers_reached = sum(c * min(k + 1, len(layers) - 1) for k, c in enumerate(histogram)) / sum(histogram)
    heads_model = full["total"] / (full["total"] - segments * (1 - mean_layer / nvium.config.num_layers)
                                   - full.get("router", 0.0) * (1 - routers_reached / max(1, len(layers) - 1)))
    report.update(exit_histogram=histogram, ideal_speedup=round(nvium.config.num_layers / mean_layer, 3),
                  heads_model=round(heads_model, 3),
                  measured_speedup=round(full["total"] / report["deferred"]["total"], 3))
    return report


if __name__ == "__main__":
    sys.exit(main())
