#!/usr/bin/env python
"""Tokenise JSONL/text corpora into Megatron .bin/.idx datasets (megatron-core IndexedDatasetBuilder).

Inputs: files, directories or globs. JSONL (.jsonl/.json/.ndjson, optionally .gz) holds one
document per line under --json-keys; any other file is plain text, one document per file.
Writes OUT_<key>_document.bin/.idx (uint16 tokens when the vocabulary has < 65500 entries,
int32 otherwise) and OUT_<key>_document.summary.json (documents, tokens, skipped lines with
reasons and first file:line positions, seconds, tokenizer hash). Files are written under
*.tmp names and renamed when complete. Output bytes do not depend on --workers.

Example:
  python tools/preprocess_data.py --input data/shakespeare/train.jsonl --json-keys text \\
      --tokenizer-model data/tok/shakespeare.model --output-prefix data/bin/shakespeare_train \\
      --append-eod --workers 2
"""

import argparse
import json
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (quote globs)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenise, one dataset each")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model (tools/train_tokenizer.py)")
    p.add_argument("--output-prefix", required=True, help="writes OUT_<key>_document.bin/.idx/.summary.json")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document id (eos) to each document")
    p.add_argument("--workers", type=int, default=1, help="tokeniser processes (default 1: in-process)")
    p.add_argument("--partitions", type=int, default=1,
                   help="split the input files into P contiguous groups, each finished as a partial dataset "
                        "under OUT.partitions.tmp/ and then concatenated; an interrupted run resumes at the "
                        "first unfinished partition")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first malformed line / missing key / empty document instead of skipping it")
    p.add_argument("--dtype", choices=["auto", "uint16", "int32"], default="auto",
                   help="token dtype (auto: uint16 if vocab < 65500 else int32)")
    p.add_argument("--max-document-bytes", type=int, default=256 << 20,
                   help="skip (or with --strict fail on) documents larger than this")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nvium_dist.data.indexed import DatasetFormatError
    from nvium_dist.data.preprocess import PreprocessError, preprocess

    try:
        summaries = preprocess(
            args.input, args.output_prefix, args.tokenizer_model, json_keys=args.json_keys,
            append_eod=args.append_eod, workers=args.workers, partitions=args.partitions, strict=args.strict,
            dtype=args.dtype, progress=not args.no_progress, max_document_bytes=args.max_document_bytes,
        )
    except (PreprocessError, DatasetFormatError, FileNotFoundError, ValueError) as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preprocess_data.py: interrupted; no output was renamed into place", file=sys.stderr)
        return 130
    for s in summaries.values():
        short = {k: s[k] for k in ("output_prefix", "documents", "tokens", "skipped_total", "seconds",
                                   "docs_per_s", "tokens_per_s", "dtype")}
        print(json.dumps(short))
        for reason, e in s["skipped"].items():
            firsts = ", ".join(f"{p['file']}:{p['line']}" for p in e["first"][:3])
            print(f"  skipped {e['count']} x {reason} (first at {firsts})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
