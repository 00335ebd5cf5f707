#!/usr/bin/env python
"""Tokenise corpora into Megatron .bin/.idx datasets (megatron-core's format, byte for byte, without importing it).

Inputs, one of:
  --input FILES/DIRS/GLOBS   JSONL (.jsonl/.json/.ndjson, optionally .gz) holds one document per line under
                             --json-keys; other files are plain text, one document per file. Inside a
                             directory only corpus files are read (JSONL, .txt/.text/.md/.rst, plain or .gz);
                             the others (a tokenizer .model, parquet, README) are listed as ignored.
  --hf-dataset NAME_OR_PATH  a Hugging Face dataset: a save_to_disk directory, parquet or arrow files (paths,
                             globs or a directory of them), or a dataset name already in the local cache
                             (nothing is downloaded); --hf-split chooses the split, --json-keys the columns,
                             --hf-streaming reads parquet/arrow/cache without building an arrow copy first.
Pre-tokenized corpora: --input-ids-key KEY writes the id lists under KEY (JSONL lists or a dataset column)
as they are, without a tokenizer: each id is checked against --vocab-size (or the --tokenizer-model's),
--append-eod appends --eod-id (or the tokenizer's eos), and the summary records the id range.

Writes OUT_<key>_document.bin/.idx (uint16 tokens when the vocabulary has < 65500 entries, int32
otherwise) and OUT_<key>_document.summary.json (documents, tokens, id range, skipped records with reasons
and first file:line positions, seconds, tokenizer hash). Files are written under *.tmp names and renamed
when complete. Output bytes do not depend on --workers, and the same documents give the same bytes from
JSONL or from a dataset. A run that writes no document fails unless --allow-empty. Ctrl-C and SIGTERM stop
cleanly, leaving no file that looks like a dataset.

Memory: inputs stream in ~1 MiB chunks (4 per worker in flight), and a line or row larger than
--max-document-bytes is skipped without being held. Tokenising one document takes up to ~50x its size, so
peak memory per worker is about 50 x --max-document-bytes (default 16 MiB: ~0.8 GB). Lower it to bound
memory further, raise it (and the memory) to keep larger documents.

Examples:
  python tools/preprocess_data.py --input data/shakespeare/train.jsonl --json-keys text \\
      --tokenizer-model data/tok/shakespeare.model --output-prefix data/bin/shakespeare_train --append-eod --workers 2
  python tools/preprocess_data.py --hf-dataset data/hf/c4_subset --hf-split train --json-keys text \\
      --tokenizer-model tok.model --output-prefix data/bin/c4 --append-eod --workers 8
  python tools/preprocess_data.py --hf-dataset 'data/c4-tok/*.parquet' --hf-streaming --input-ids-key input_ids \\
      --vocab-size 32000 --eod-id 2 --append-eod --output-prefix data/bin/c4_pretok
"""

import argparse
import json
import signal
import sys

from nvium_dist.cli import file_prefix, int_at_least
from nvium_dist.data.preprocess import DEFAULT_MAX_DOCUMENT_BYTES



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="files, directories or globs (quote globs)")
    source.add_argument("--hf-dataset", help="save_to_disk directory, parquet/arrow files, or a cached dataset name")
    p.add_argument("--hf-split", default="train", help="--hf-dataset: the split to read (default train)")
    p.add_argument("--hf-streaming", action="store_true",
                   help="--hf-dataset: stream parquet/arrow/cached data instead of building an arrow cache copy")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys / columns to tokenise, one dataset each")
    p.add_argument("--input-ids-key", default=None,
                   help="pre-tokenized input: write the id lists under this key/column as they are")
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model (tools/train_tokenizer.py); optional with --input-ids-key")
    p.add_argument("--vocab-size", type=int_at_least(1), default=None,
                   help="--input-ids-key: ids must be < this (default: the tokenizer's vocabulary)")
    p.add_argument("--eod-id", type=int_at_least(0), default=None,
                   help="--input-ids-key: the end-of-document id --append-eod appends (default: the tokenizer's eos)")
    p.add_argument("--output-prefix", type=file_prefix, required=True, help="writes OUT_<key>_document.bin/.idx/.summary.json")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document id (eos) to each document")
    p.add_argument("--workers", type=int_at_least(1), default=1, help="tokeniser processes (default 1: in-process)")
    p.add_argument("--partitions", type=int_at_least(1), default=1,
                   help="split the input files into P contiguous groups, each finished as a partial dataset "
                        "under OUT.partitions.tmp/ and then concatenated; an interrupted run resumes at the "
                        "first unfinished partition (files only, not --hf-dataset)")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first malformed line / missing key / empty document instead of skipping it")
    p.add_argument("--allow-empty", action="store_true", help="write a dataset even when no document survives")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT_<key>_document.bin/.idx that this tool did not write "
                        "(its own earlier output is replaced without it)")
    p.add_argument("--dtype", choices=["auto", "uint16", "int32"], default="auto",
                   help="token dtype (auto: uint16 if vocab < 65500 else int32)")
    p.add_argument("--max-document-bytes", type=int_at_least(1), default=DEFAULT_MAX_DOCUMENT_BYTES,
                   help="skip (or with --strict fail on) documents larger than this; bounds memory: a worker "
                        "needs up to ~50x this to tokenise one document (default 16 MiB)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # clean up like Ctrl-C
    try:
        from nvium_dist.data.indexed import DatasetFormatError
        from nvium_dist.data.preprocess import PreprocessError, preprocess

        summaries = preprocess(
            args.input, args.output_prefix, args.tokenizer_model, json_keys=args.json_keys,
            append_eod=args.append_eod, workers=args.workers, partitions=args.partitions, strict=args.strict,
            dtype=args.dtype, progress=not args.no_progress, max_document_bytes=args.max_document_bytes,
            hf_dataset=args.hf_dataset, hf_split=args.hf_split, hf_streaming=args.hf_streaming,
            input_ids_key=args.input_ids_key, vocab_size=args.vocab_size, eod_id=args.eod_id,
            allow_empty=args.allow_empty, force=args.force,
        )
    except (PreprocessError, DatasetFormatError, OSError, ValueError) as err:  # OSError: e.g. an unwritable output
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        how = "SIGTERM" if str(err) == "SIGTERM" else "interrupted"
        print(f"preprocess_data.py: {how}: stopped; no output was renamed into place", file=sys.stderr)
        return 143 if how == "SIGTERM" else 130
    for s in summaries.values():
        short = {k: s[k] for k in ("output_prefix", "documents", "tokens", "id_range", "skipped_total", "seconds",
                                   "docs_per_s", "tokens_per_s", "dtype")}
        print(json.dumps(short))
        for reason, e in s["skipped"].items():
            firsts = ", ".join(f"{p['file']}:{p['line']}" for p in e["first"][:3])
            print(f"  skipped {e['count']} x {reason} (first at {firsts})", file=sys.stderr)
    ignored = next(iter(summaries.values()))["ignored_inputs"]
    if ignored:
        shown = ", ".join(ignored[:5]) + (f", ... ({len(ignored)} in all)" if len(ignored) > 5 else "")
        print(f"  ignored {len(ignored)} non-corpus file(s) inside input directories: {shown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
