#!/usr/bin/env python
"""Merge several Megatron .bin/.idx datasets into one, keeping documents and their order.

Inputs are dataset prefixes (X for X.bin/X.idx; a trailing .bin/.idx is accepted). They are
validated, must share a token dtype and the tokenizer their .summary.json files record (an input without such a
record needs --allow-unverified), and are concatenated in megatron-core's format (as its
IndexedDatasetBuilder.add_index would, without importing it). The merged .summary.json records that tokenizer,
so training's tokenizer check covers the result.

Example:
  python tools/merge_datasets.py --inputs data/bin/a_text_document data/bin/b_text_document \\
      --output-prefix data/bin/ab_text_document
"""

import argparse
import json
import sys

from nvium_dist.cli import file_prefix


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="dataset prefixes, merged in this order")
    p.add_argument("--output-prefix", type=file_prefix, required=True, help="writes OUTPUT_PREFIX.bin/.idx/.summary.json")
    p.add_argument("--allow-unverified", action="store_true",
                   help="merge inputs whose summary records no tokenizer (training then checks every id)")
    args = p.parse_args(argv)
    from nvium_dist.data.merge import merge_datasets

    try:
        summary = merge_datasets(args.inputs, args.output_prefix, args.allow_unverified)
    except (ValueError, OSError) as err:  # DatasetFormatError is a ValueError; OSError: an unwritable output
        print(f"merge_datasets.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
