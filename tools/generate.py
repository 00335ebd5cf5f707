#!/usr/bin/env python
"""Sample text from an N-vium export, exactly from the mixture (deferred decoding by default).

    python tools/generate.py --model exports/tiny --prompt "ROMEO:" --max-new-tokens 100 --show-exits
    python tools/generate.py --model exports/tiny "ROMEO. " "Enter KING HENRY"       # two prompts, one batch
    python tools/generate.py --model exports/tiny --prompt-file prompts.txt --mode full --temperature 0.8
    python tools/generate.py --model exports/tiny --prompt-ids 1,523,77 --pipeline-stages 2

--mode deferred runs each token only up to its sampled exit and completes upper layers later (exact);
--mode full runs every layer every step. Temperature/top-k/top-p/greedy change the distribution and need
every head, so they require --mode full. One prompt streams its text as it is generated; several
prompts decode as one batch (or --max-batch rows at a time, continuous batching) and print at the end. Prints tokens/s, the exit histogram and the mean exit depth.
"""
from __future__ import annotations

import argparse
import sys

from nvium_dist.cli import float_above, int_at_least, int_list, load_generator, probability


class TextStream:
    """Text of a growing token sequence, one token's worth at a time. SentencePiece pieces carry their
    leading space ("▁we"), which decoding a piece alone drops: each token's text is what it adds to the
    decoded whole. A token that ends inside a multi-byte character adds nothing until the character completes."""

    def __init__(self, tokenizer, prompt: list[int]):
        self.tokenizer, self.ids = tokenizer, list(prompt)
        self.text = tokenizer.decode(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""  # an incomplete character: wait for the bytes that complete it
        new, self.text = text[len(self.text):], text
        return new


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export directory (tools/export_checkpoint.py --output)")
    p.add_argument("prompts", nargs="*", help="prompt texts (one batch row each); same as --prompt")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable: one batch row each)")
    p.add_argument("--prompt-file", help="file with one prompt per line (blank lines skipped)")
    p.add_argument("--prompt-ids", action="append", type=int_list(0), default=[],
                   help="comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["deferred", "full"], default="deferred")
    p.add_argument("--temperature", type=float_above(0), default=1.0,
                   help="> 0; needs --mode full when != 1 (the argmax: --greedy)")
    p.add_argument("--top-k", type=int_at_least(0), default=0, help="needs --mode full (0 = off)")
    p.add_argument("--top-p", type=probability, default=1.0, help="in (0, 1]; needs --mode full (1 = off)")
    p.add_argument("--greedy", action="store_true", help="argmax of p_mix; needs --mode full")
    p.add_argument("--pipeline-stages", type=int_at_least(1), default=1, help="decode with this many stage processes")
    p.add_argument("--max-batch", type=int_at_least(1), default=None,
                   help="rows decoded together (default: every prompt); more prompts than rows enter rows as "
                        "earlier sequences finish (continuous batching)")
    p.add_argument("--show-exits", action="store_true", help="print each token's exit index after it, as [k]")
    p.add_argument("--stop-at-eos", action="store_true", help="stop a sequence at the tokenizer's EOS token")
    p.add_argument("--threads", type=int_at_least(0), default=0,
                   help="torch CPU threads (0: 1 thread for models narrower than 1024, else torch's default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --device cuda and one sequence at a time: replay single-token segment calls as CUDA "
                        "graphs (same tokens up to float rounding)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    texts = list(args.prompts) + list(args.prompt)
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
            print(f"error: prompt {i + 1} ({text.encode('utf-8', 'backslashreplace')[:40]!r}) is not valid UTF-8; "
                  "pass text in UTF-8, or token ids with --prompt-ids", file=sys.stderr)
            return 2
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as err:
            print(f"error: cannot read --prompt-file: {err}", file=sys.stderr)
            return 2
        except UnicodeDecodeError as err:
            print(f"error: --prompt-file {args.prompt_file} is not UTF-8 text (byte {err.start}: {err.reason}); "
                  "give one prompt per line in UTF-8", file=sys.stderr)
            return 2
    id_prompts = args.prompt_ids
    if not texts and not id_prompts:
        print("error: give at least one prompt (positional, --prompt, --prompt-file or --prompt-ids)", file=sys.stderr)
        return 2

    if args.cuda_graphs and args.device != "cuda":
        print("error: --cuda-graphs needs --device cuda", file=sys.stderr)
        return 2

    from nvium_dist.checkpoint_io import CheckpointError
    from nvium_dist.inference import GenerationError

    generator, error = load_generator(args.model, args.device, args.threads)
    if error:
        print(error, file=sys.stderr)
        return 2
    try:
        tok = generator.tokenizer
        vocab = generator.config.vocab_size
        for spec, ids in zip(args.prompt_ids, id_prompts):
            outside = [i for i in ids if not 0 <= i < vocab]
            if outside:
                print(f"error: --prompt-ids {spec!r}: token id {outside[0]} is outside the vocabulary 0..{vocab - 1} "
                      f"of {args.model}", file=sys.stderr)
                return 2
        prompts = [tok.encode(t) for t in texts] + id_prompts
        eos = tok.eos_id if args.stop_at_eos else None
        if args.stop_at_eos and eos is None:
            print("warning: this export's tokenizer has no EOS token; --stop-at-eos is ignored", file=sys.stderr)
        streaming = len(prompts) == 1 and args.pipeline_stages == 1
        if streaming:
            stream = TextStream(tok, prompts[0])
            sys.stdout.write(stream.text)
            sys.stdout.flush()

        def on_step(tick, sampled):  # {sequence: (token, exit)} of one engine tick
            token, exit = sampled[0]
            sys.stdout.write(stream.add(token) + (f"[{exit}]" if args.show_exits else ""))
            sys.stdout.flush()

        out = generator.generate(prompts, args.max_new_tokens, seed=args.seed, mode=args.mode,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                                 eos_id=eos, pipeline_stages=args.pipeline_stages, max_batch=args.max_batch,
                                 on_step=on_step if streaming else None, fixed_shape_calls=args.cuda_graphs)
    except (GenerationError, CheckpointError) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    if streaming:
        print()
    else:
        for i, (prompt, tokens, exits) in enumerate(zip(out.prompts, out.tokens, out.exits)):
            print(f"--- sequence {i}")
            if args.show_exits:
                stream = TextStream(tok, prompt)
                print(stream.text + "".join(stream.add(t) + f"[{e}]" for t, e in zip(tokens, exits)))
            else:
                print(tok.decode(prompt + tokens))
    hist = out.exit_histogram()
    total = max(1, sum(hist))
    config = generator.config
    stats = (f"{out.num_tokens} tokens in {out.seconds:.2f} s = {out.tokens_per_second:.1f} tokens/s "
             f"(mode={args.mode}, {len(prompts)} sequence(s) in {len(set(out.rows))} row(s), "
             f"{args.pipeline_stages} stage(s))")
    print(stats, file=sys.stderr)
    if sum(hist):
        parts = ", ".join(f"exit {k} (layer {layer}): {c} ({100 * c / total:.0f}%)"
                          for k, (c, layer) in enumerate(zip(hist, config.exit_layers)))
        mean = out.mean_exit_layer()
        print(f"exits: {parts}\nmean exit depth {mean:.2f} of {config.num_layers} layers "
              f"(ideal deferred speedup {config.num_layers / mean:.2f}x)", file=sys.stderr)
    else:
        print("exits: not applicable (transformed sampling draws from the full mixture)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
