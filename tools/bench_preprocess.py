#!/usr/bin/env python
"""Benchmark tools/preprocess_data.py throughput with 1 and with 2 workers, side by side.

Generates a JSONL corpus of at least --size-mb MB in a temp dir from the embedded default corpus
(Shakespeare scenes, repeated in seeded shuffled orders), trains a SentencePiece model on the
default corpus, tokenises the corpus with --workers 1 and --workers 2 (same inputs, same
tokenizer), checks the two outputs are byte-identical and prints one JSON object:
tokens/s and docs/s for each worker count and the speedup of 2 workers over 1.
The megatron-core import is excluded from the timings (done once before).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

from nvium_dist.cli import float_above, int_at_least


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float_above(0), default=55.0, help="generated corpus size (default 55 MB)")
    p.add_argument("--vocab-size", type=int_at_least(1), default=32000)
    p.add_argument("--workers", type=int_at_least(1), nargs="+", default=[1, 2])
    p.add_argument("--files", type=int_at_least(1), default=4, help="number of JSONL files the corpus is split into")
    p.add_argument("--keep", default=None,
                   help="keep the work directory here (a new or empty directory) instead of a temp dir")
    args = p.parse_args(argv)
    if args.keep and os.path.exists(args.keep) and not (os.path.isdir(args.keep) and not os.listdir(args.keep)):
        print(f"bench_preprocess.py: error: --keep {args.keep} exists and is not an empty directory", file=sys.stderr)
        return 2
    work = args.keep or tempfile.mkdtemp(prefix="nvium_bench_pre_")
    try:
        return bench(args, work)
    except ValueError as err:  # e.g. a vocabulary too small or too large for the corpus
        print(f"bench_preprocess.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def bench(args, work: str) -> int:
    import filecmp
    import random
    import time

    from nvium_dist.data.default_corpus import iter_documents
    from nvium_dist.data.preprocess import _import_builder, preprocess
    from nvium_dist.data.spm_train import train_sentencepiece

    os.makedirs(work, exist_ok=True)
    docs = [d.text for d in iter_documents("scene")]
    t = time.time()
    tok = train_sentencepiece(iter(docs), os.path.join(work, "tok"), vocab_size=args.vocab_size, num_threads=2)
    train_s = time.time() - t
    target = int(args.size_mb * 1e6)
    rng = random.Random(0)
    paths = [os.path.join(work, f"corpus_{i:02d}.jsonl") for i in range(args.files)]
    handles = [open(x, "w", encoding="utf-8") for x in paths]
    written, n_docs, rep = 0, 0, 0
    while written < target:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            line = json.dumps({"text": docs[i], "rep": rep}) + "\n"
            handles[n_docs % args.files].write(line)
            written += len(line.encode("utf-8"))
            n_docs += 1
        rep += 1
    for h in handles:
        h.close()
    _import_builder()

    results = {}
    outputs = {}
    load_before = [round(x, 2) for x in os.getloadavg()]
    for w in args.workers:
        out = os.path.join(work, f"out_w{w}")
        s = preprocess(paths, out, tok["model"], ["text"], append_eod=True, workers=w, progress=False)["text"]
        results[f"workers_{w}"] = {"tokens_per_s": s["tokens_per_s"], "docs_per_s": s["docs_per_s"],
                                   "seconds": s["seconds"], "tokens": s["tokens"], "documents": s["documents"]}
        outputs[w] = s["output_prefix"]
    ws = args.workers
    identical = all(
        filecmp.cmp(outputs[ws[0]] + ext, outputs[w] + ext, shallow=False) for w in ws[1:] for ext in (".bin", ".idx")
    )
    report = {
        "corpus_bytes": sum(os.path.getsize(x) for x in paths),
        "corpus_files": len(paths),
        "corpus_documents": n_docs,
        "tokenizer_vocab": tok["vocab_size"],
        "tokenizer_train_seconds": round(train_s, 2),
        "cpu_count": os.cpu_count(),
        # other processes competing for the cores make the 2-worker number meaningless; check these
        "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        **results,
        "outputs_identical": identical,
    }
    if 1 in ws and 2 in ws:
        report["speedup_2_over_1"] = round(results["workers_2"]["tokens_per_s"] / results["workers_1"]["tokens_per_s"], 3)
    print(json.dumps(report, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
