#!/usr/bin/env python
"""Convert an nvium export to a Hugging Face transformers directory.

    python tools/convert_to_hf.py exports/tiny-dense hf/tiny-dense     # -> stock LlamaForCausalLM
    python tools/convert_to_hf.py exports/tiny hf/tiny                 # -> NviumForCausalLM (trust_remote_code)

A dense export (no exits) becomes a stock LlamaForCausalLM: AutoModelForCausalLM.from_pretrained(OUT) loads it
without remote code. An N-vium export becomes a directory with its own modeling_nvium.py (auto_map;
from_pretrained(OUT, trust_remote_code=True)) whose forward returns log p_mix as the logits, so
model.generate(do_sample=True) samples the mixture exactly and any tool that scores logits scores the mixture;
the output also carries head_log_probs [b, s, K, V], exit_probs [b, s, K-1] and mixture_weights [b, s, K].
generation_config.json is set for plain sampling (top_k=0: transformers otherwise applies top-k 50). A
SentencePiece tokenizer is written as tokenizer.json (+ tokenizer.model) giving the same ids as nvium (no BOS).

The result is loaded back with transformers and its log-probabilities compared with nvium's (--tolerance)
before it is moved into place. OUT may not be, hold or sit inside EXPORT. It must be absent, empty or an earlier
output of this tool; files this tool did not write there are never replaced (it names them and stops), and --force
only replaces its own files changed since. nvium_conversion.json records the sha256 of every file written:
convert_from_hf.py and this tool's self-check refuse a directory whose files (modeling_nvium.py above all)
changed since.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from nvium_dist.cli import float_at_least


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="nvium export directory (tools/export_checkpoint.py or convert_from_hf.py)")
    p.add_argument("output", help="transformers directory to write")
    p.add_argument("--force", action="store_true", help="replace an earlier output of this tool even where its files were changed since")
    p.add_argument("--tolerance", type=float_at_least(0), default=1e-4,
                   help="max |difference| of the self-check log-probabilities (default 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip loading the result back with transformers")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nvium_dist.checkpoint_io import CheckpointError
    from nvium_dist.output_dir import OutputDirError
    from nvium_dist.hf.to_hf import SelfCheckError, convert_export

    try:
        summary = convert_export(args.export, args.output, force=args.force, check=not args.no_check,
                                 tolerance=args.tolerance)
    except (CheckpointError, OutputDirError, SelfCheckError) as err:
        print(f"convert_to_hf.py: error: {err}", file=sys.stderr)
        return 2
    for note in summary.pop("notes"):
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
