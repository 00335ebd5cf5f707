#!/usr/bin/env python
"""Inspect a Megatron .bin/.idx dataset: counts, document length histogram, first documents decoded.

Example:
  python tools/inspect_dataset.py data/bin/shakespeare_train_text_document \\
      --tokenizer-model data/tok/shakespeare.model --show 2
"""

import argparse
import json
import sys

from nvium_dist.cli import int_at_least


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix (X for X.bin/X.idx)")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece .model to decode documents with")
    p.add_argument("--show", type=int_at_least(0), default=3, help="decode this many first documents (needs --tokenizer-model)")
    p.add_argument("--max-chars", type=int_at_least(0), default=400, help="print at most this many characters per document")
    p.add_argument("--bins", type=int_at_least(1), default=10, help="histogram bins (log-spaced)")
    p.add_argument("--json", action="store_true", help="print only the statistics as JSON")
    args = p.parse_args(argv)

    import numpy as np

    from nvium_dist.data.indexed import DatasetFormatError, open_indexed_dataset, validate_indexed_files

    try:
        tok = None
        vocab = None
        if args.tokenizer_model:
            from nvium_dist.data.tokenizer import SentencePieceTokenizer

            tok = SentencePieceTokenizer(args.tokenizer_model)
            vocab = tok.vocab_size
        info = validate_indexed_files(args.prefix, vocab)
        ds = open_indexed_dataset(args.prefix, vocab)
    except (DatasetFormatError, FileNotFoundError, ValueError) as err:
        print(f"inspect_dataset.py: error: {err}", file=sys.stderr)
        return 2
    docs = np.asarray(ds.document_indices)
    seq = np.asarray(ds.sequence_lengths, dtype=np.int64)
    csum = np.concatenate([[0], np.cumsum(seq)])
    doc_len = csum[docs[1:]] - csum[docs[:-1]]
    stats = {
        "prefix": info["prefix"],
        "dtype": np.dtype(info["dtype"]).name,
        "documents": int(len(doc_len)),
        "sequences": int(info["sequences"]),
        "tokens": int(info["tokens"]),
        "bin_bytes": int(info["tokens"] * np.dtype(info["dtype"]).itemsize),
    }
    if len(doc_len):
        stats.update(min_len=int(doc_len.min()), max_len=int(doc_len.max()), mean_len=round(float(doc_len.mean()), 2),
                     median_len=float(np.median(doc_len)))
        lo, hi = max(1, int(doc_len.min())), max(2, int(doc_len.max()) + 1)
        edges = np.unique(np.geomspace(lo, hi, args.bins + 1).astype(np.int64))
        counts, edges = np.histogram(doc_len, bins=edges)
        stats["histogram"] = [{"from": int(a), "to": int(b), "documents": int(c)}
                              for a, b, c in zip(edges[:-1], edges[1:], counts)]
        if tok is not None:
            stats["max_token_id"] = int(max(int(np.max(ds[i])) if len(ds[i]) else 0 for i in range(min(len(ds), 1000))))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(json.dumps({k: v for k, v in stats.items() if k != "histogram"}, indent=2))
    if "histogram" in stats:
        width = max(h["documents"] for h in stats["histogram"]) or 1
        print("document length histogram (tokens):")
        for h in stats["histogram"]:
            print(f"  [{h['from']:>8}, {h['to']:>8})  {h['documents']:>8}  {'#' * int(40 * h['documents'] / width)}")
    if tok is not None:
        for d in range(min(args.show, len(doc_len))):
            ids = np.concatenate([ds[i] for i in range(int(docs[d]), int(docs[d + 1]))]) if docs[d + 1] > docs[d] else []
            text = tok.decode(ids)
            more = "..." if len(text) > args.max_chars else ""
            print(f"--- document {d}: {len(ids)} tokens ---")
            print(text[: args.max_chars] + more)
    return 0


if __name__ == "__main__":
    sys.exit(main())
