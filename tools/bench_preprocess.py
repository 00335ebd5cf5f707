#!/usr/bin/env python
"""Benchmark tools/preprocess_data.py by worker count, optionally side by side with Megatron-LM's own tool.

Generates a JSONL corpus of at least --size-mb MB in a temp dir from the embedded default corpus
(Shakespeare scenes, repeated in seeded shuffled orders), trains a SentencePiece model on the
default corpus, then times each tool as a user runs it (a fresh process, start-up and imports included)
on the same files, tokenizer and worker counts, rounds interleaved, and checks that every output is
byte-identical. Prints one JSON object: median wall seconds and tokens/s per tool and worker count,
nvium's speed relative to Megatron's, scaling from the first worker count to the others, load averages.

  python tools/bench_preprocess.py --size-mb 30 --workers 1 2 --megatron ~/Megatron-LM

--megatron PATH is a Megatron-LM checkout: PATH/tools/preprocess_data.py runs with PATH first on
PYTHONPATH (--tokenizer-type SentencePieceTokenizer --append-eod).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from nvium_dist.cli import float_above, int_at_least

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float_above(0), default=55.0, help="generated corpus size (default 55 MB)")
    p.add_argument("--vocab-size", type=int_at_least(1), default=32000)
    p.add_argument("--workers", type=int_at_least(1), nargs="+", default=[1, 2])
    p.add_argument("--files", type=int_at_least(1), default=1,
                   help="number of JSONL files the corpus is split into (Megatron's tool reads one: keep 1 with "
                        "--megatron)")
    p.add_argument("--rounds", type=int_at_least(1), default=1, help="interleaved runs per tool and worker count")
    p.add_argument("--megatron", help="a Megatron-LM checkout whose tools/preprocess_data.py runs side by side")
    p.add_argument("--keep", default=None,
                   help="keep the work directory here (a new or empty directory) instead of a temp dir")
    args = p.parse_args(argv)
    if args.keep and os.path.exists(args.keep) and not (os.path.isdir(args.keep) and not os.listdir(args.keep)):
        print(f"bench_preprocess.py: error: --keep {args.keep} exists and is not an empty directory", file=sys.stderr)
        return 2
    if args.megatron and not (Path(args.megatron) / "tools" / "preprocess_data.py").is_file():
        print(f"bench_preprocess.py: error: --megatron {args.megatron} has no tools/preprocess_data.py; give the "
              "root of a Megatron-LM checkout", file=sys.stderr)
        return 2
    if args.megatron and args.files != 1:
        print("bench_preprocess.py: error: Megatron's tool reads one input file: use --files 1 with --megatron",
              file=sys.stderr)
        return 2
    work = args.keep or tempfile.mkdtemp(prefix="nvium_bench_pre_")
    try:
        return bench(args, work)
    except (ValueError, subprocess.CalledProcessError) as err:  # e.g. a vocabulary too small for the corpus
        print(f"bench_preprocess.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def write_corpus(paths: list[str], target_bytes: int) -> int:
    """Default-corpus scenes in seeded shuffled orders, round-robin over `paths`, until `target_bytes`.
    -> documents written."""
    import random

    from nvium_dist.data.default_corpus import iter_documents

    docs = [d.text for d in iter_documents("scene")]
    rng = random.Random(0)
    handles = [open(x, "w", encoding="utf-8") for x in paths]
    written, count, rep = 0, 0, 0
    while written < target_bytes:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            line = json.dumps({"text": docs[i], "rep": rep}) + "\n"
            handles[count % len(paths)].write(line)
            written += len(line.encode("utf-8"))
            count += 1
        rep += 1
    for h in handles:
        h.close()
    return count


def timed_run(cmd: list[str], env: dict) -> float:
    import time

    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def bench(args, work: str) -> int:
    import filecmp
    import time

    from nvium_dist.data.default_corpus import iter_documents
    from nvium_dist.data.spm_train import train_sentencepiece

    os.makedirs(work, exist_ok=True)
    t = time.time()
    tok = train_sentencepiece((d.text for d in iter_documents("scene")), os.path.join(work, "tok"),
                              vocab_size=args.vocab_size, num_threads=2)
    train_s = time.time() - t
    paths = [os.path.join(work, f"corpus_{i:02d}.jsonl") for i in range(args.files)]
    documents = write_corpus(paths, int(args.size_mb * 1e6))

    def command(tool: str, workers: int, prefix: str) -> tuple[list[str], dict]:
        if tool == "nvium":
            return ([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", *paths, "--json-keys",
                     "text", "--tokenizer-model", tok["model"], "--output-prefix", prefix, "--append-eod",
                     "--workers", str(workers), "--no-progress", "--force"], dict(os.environ))
        path = os.path.abspath(args.megatron)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
        return ([sys.executable, os.path.join(path, "tools", "preprocess_data.py"), "--input", paths[0],
                 "--json-keys", "text", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                 tok["model"], "--output-prefix", prefix, "--append-eod", "--workers", str(workers),
                 "--log-interval", str(10**9)], env)

    tools = ["nvium"] + (["megatron"] if args.megatron else [])
    seconds = {(tool, w): [] for tool in tools for w in args.workers}
    loads = []
    for _ in range(args.rounds):
        for tool in tools:
            for w in args.workers:
                cmd, env = command(tool, w, os.path.join(work, f"{tool}_w{w}"))
                load_before = os.getloadavg()[0]
                seconds[tool, w].append(timed_run(cmd, env))
                loads.append([round(load_before, 2), round(os.getloadavg()[0], 2)])
    outputs = [os.path.join(work, f"{tool}_w{w}_text_document") for tool in tools for w in args.workers]
    identical = all(filecmp.cmp(outputs[0] + ext, other + ext, shallow=False)
                    for other in outputs[1:] for ext in (".bin", ".idx"))
    with open(outputs[0] + ".summary.json") as f:
        tokens = json.load(f)["tokens"]
    report = {"corpus_bytes": sum(os.path.getsize(x) for x in paths), "corpus_files": len(paths),
              "corpus_documents": documents, "tokens": tokens, "tokenizer_vocab": tok["vocab_size"],
              "tokenizer_train_seconds": round(train_s, 2), "cpu_count": os.cpu_count(), "rounds": args.rounds,
              # other processes competing for the cores make the multi-worker numbers meaningless; check these
              "loadavg_1min_before_after_each_run": loads}
    first = args.workers[0]
    for tool in tools:
        median = {w: statistics.median(seconds[tool, w]) for w in args.workers}
        report[tool] = {f"workers_{w}": {"seconds": round(median[w], 2), "per_round": [round(s, 2) for s in
                                                                                       seconds[tool, w]],
                                         "tokens_per_s": round(tokens / median[w])} for w in args.workers}
        report[tool]["scaling"] = {f"{w}_over_{first}": round(median[first] / median[w], 3) for w in args.workers[1:]}
    if args.megatron:
        report["nvium_speed_vs_megatron"] = {
            f"workers_{w}": round(statistics.median(seconds["megatron", w]) / statistics.median(seconds["nvium", w]), 3)
            for w in args.workers}
    report["outputs_identical"] = identical
    print(json.dumps(report, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
