#!/usr/bin/env python
"""Evaluate an export on a Megatron .bin/.idx dataset (mixture and per-head perplexity, exit usage, depth)
or on lm-evaluation-harness tasks.

    python tools/evaluate.py --model exports/tiny --data runs/tiny/data/shakespeare_text_document
    python tools/evaluate.py --model exports/tiny --lm-eval hellaswag,arc_easy --num-fewshot 0
    python tools/evaluate.py --model exports/tiny --lm-eval my_task --include-path tasks/   # your YAML tasks

Documents are concatenated and cut into non-overlapping windows of seq_length + 1 tokens (the first
--max-windows of them). Prints one JSON object: mixture perplexity (exp of mean -log p_mix), each
head's perplexity, the mean mixture weights pi_k (exit usage), the expected exit depth in layers and
the ideal deferred-decoding speedup num_layers / expected depth. --lm-eval instead runs the named tasks through
lm-eval's `nvium` model type (nvium_dist/evaluation/lm_eval_model.py: log p_mix scores, exact sampling) and
prints lm-eval's per-task results (tasks whose data is not in the local Hugging Face cache need a network).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from nvium_dist.cli import float_above, int_at_least, torch_setup_error


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="dataset prefix PREFIX of PREFIX.bin / PREFIX.idx")
    source.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks")
    p.add_argument("--seq-length", type=int_at_least(0), default=0,
                   help="window length (default 0: the model's seq_length)")
    p.add_argument("--max-windows", type=int_at_least(1), default=64, help="evaluate at most this many windows")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--threads", type=int_at_least(0), default=0,
                   help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--include-path", default=None, help="--lm-eval: a directory of your own task YAML files")
    p.add_argument("--num-fewshot", type=int_at_least(0), default=None, help="--lm-eval: few-shot examples per task")
    p.add_argument("--limit", type=float_above(0), default=None,
                   help="--lm-eval: documents per task (a count >= 1, or a fraction < 1 of each task's documents)")
    p.add_argument("--seed", type=int, default=1234, help="--lm-eval: sampling seed of generate_until")
    p.add_argument("--require-live-heads", action="store_true",
                   help="exit 3 when a head is dead: its own perplexity >= the vocabulary size (worse than uniform)")
    return p.parse_args(argv)


def lm_eval_main(args) -> int:
    """lm-eval's simple_evaluate with the `nvium` model type; prints its per-task results as JSON."""
    from nvium_dist.checkpoint_io import CheckpointError, read_export_config

    try:
        read_export_config(args.model)  # before lm-eval's slow import
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.include_path is not None and not os.path.isdir(args.include_path):
        what = "is not a directory" if os.path.exists(args.include_path) else "does not exist"
        print(f"error: --include-path {args.include_path} {what}; give the directory of your task YAML files",
              file=sys.stderr)
        return 2
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nvium_dist.evaluation import lm_eval_model  # noqa: F401 - registers the `nvium` model type

    tasks = [task for task in args.lm_eval.split(",") if task]
    try:
        results = lm_eval.simple_evaluate(
            model="nvium", model_args={"export": args.model, "device": args.device, "seed": args.seed},
            tasks=tasks, batch_size=args.batch_size, num_fewshot=args.num_fewshot, limit=args.limit,
            task_manager=TaskManager(include_path=args.include_path))
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as err:  # no export, unknown task, no data
        print(f"error: lm-eval: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # ConnectionError and the hub's offline errors are OSErrors
        print(f"error: lm-eval could not fetch a task's data ({err}): built-in tasks such as hellaswag and "
              "arc_easy download it from the Hugging Face Hub; offline, use a YAML task over local files "
              "(--include-path DIR)", file=sys.stderr)
        return 2
    print(json.dumps({"model": args.model, "tasks": tasks, "results": results["results"],
                      "num_fewshot": results.get("n-shot", {})}, indent=2, default=str))
    return 0


def open_dataset(prefix: str, vocab_size: int, tokenizer_path):
    """The .bin/.idx at `prefix`, checked against the export: made with its tokenizer (when both record one),
    not empty, every token id inside the model's vocabulary."""
    from nvium_dist.data.tokenizer import file_sha256
    from nvium_dist.data.gpt_data import recorded_tokenizer
    from nvium_dist.data.indexed import DatasetFormatError, check_dataset_usable, open_indexed_dataset

    recorded = recorded_tokenizer(prefix)
    made_with = recorded.get("sha256")
    if made_with and tokenizer_path is not None and made_with != file_sha256(tokenizer_path):
        raise DatasetFormatError(
            f"{prefix}.bin was tokenised with {recorded.get('model')} (sha256 {made_with[:12]}), "
            f"not with the export's {tokenizer_path}: its token ids mean other text. Fix: evaluate on data "
            "made with the export's tokenizer (tools/preprocess_data.py --tokenizer-model EXPORT/tokenizer.model)")
    check_dataset_usable(prefix, vocab_size)
    return open_indexed_dataset(prefix, vocab_size)


def windows(dataset, length: int, limit: int):
    """Non-overlapping windows of `length` tokens from the concatenated documents."""
    import numpy as np

    buffer = np.zeros(0, dtype=np.int64)
    count = 0
    for i in range(len(dataset)):
        buffer = np.concatenate([buffer, np.asarray(dataset[i], dtype=np.int64)])
        while len(buffer) >= length and count < limit:
            yield buffer[:length]
            buffer = buffer[length:]
            count += 1
        if count >= limit:
            return


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.lm_eval is not None:
        return lm_eval_main(args)
    import math
    import os

    prefix = args.data[:-4] if args.data.endswith((".bin", ".idx")) else args.data
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        print(f"error: {' and '.join(missing)} not found; --data takes the prefix written by tools/preprocess_data.py "
              "(e.g. runs/tiny/data/..._text_document for its .bin and .idx)", file=sys.stderr)
        return 2

    import numpy as np
    import torch

    from nvium_dist.checkpoint_io import CheckpointError
    from nvium_dist.inference import NviumGenerator

    error = torch_setup_error(args.device, args.threads)
    if error:
        print(error, file=sys.stderr)
        return 2
    try:
        generator = NviumGenerator.from_pretrained(args.model, device=args.device)
        config = generator.config
        dataset = open_dataset(prefix, config.vocab_size, generator.tokenizer.path)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    length = (args.seq_length or config.seq_length) + 1
    if length - 1 > config.seq_length:
        print(f"error: --seq-length {length - 1} exceeds the model context {config.seq_length}", file=sys.stderr)
        return 2
    chunks = list(windows(dataset, length, args.max_windows))
    if not chunks:
        print(f"error: {prefix} has fewer than {length} tokens", file=sys.stderr)
        return 2
    num_heads = config.num_heads_total
    sums = {"nll_mix": 0.0, "nll_heads": torch.zeros(num_heads, dtype=torch.float64),
            "pi": torch.zeros(num_heads, dtype=torch.float64), "depth": 0.0}
    tokens_seen = 0
    model = generator.model
    with torch.inference_mode():
        for start in range(0, len(chunks), args.batch_size):
            batch = torch.from_numpy(np.stack(chunks[start:start + args.batch_size])).to(args.device)
            terms = model(batch[:, :-1], batch[:, 1:])  # per-head log p(label) + the mixture (mixture.py)
            n = batch[:, 1:].numel()
            tokens_seen += n
            sums["nll_mix"] += -terms.log_p_mix.double().sum().item()
            sums["nll_heads"] += -terms.log_p_heads.double().sum((0, 1)).cpu()
            sums["pi"] += terms.pi.double().sum((0, 1)).cpu()
            sums["depth"] += terms.expected_depth.double().sum().item()
            print(f"\r{min(start + args.batch_size, len(chunks))}/{len(chunks)} windows", end="", file=sys.stderr,
                  flush=True)
    print(file=sys.stderr)
    depth_fraction = sums["depth"] / tokens_seen
    result = {
        "model": args.model, "data": prefix, "windows": len(chunks), "tokens": tokens_seen,
        "seq_length": length - 1,
        "mixture_perplexity": math.exp(sums["nll_mix"] / tokens_seen),
        "mixture_cross_entropy": sums["nll_mix"] / tokens_seen,
        "head_perplexity": [math.exp(x / tokens_seen) for x in sums["nll_heads"].tolist()],
        "exit_layers": config.exit_layers,
        "exit_usage": [x / tokens_seen for x in sums["pi"].tolist()],
        "expected_depth_fraction": depth_fraction,
        "expected_exit_layer": depth_fraction * config.num_layers,
        "ideal_deferred_speedup": 1.0 / depth_fraction if depth_fraction > 0 else None,
    }
    # a head that does worse than the uniform distribution has stopped learning (routing collapse)
    result["dead_heads"] = [layer for layer, ppl in zip(config.exit_layers, result["head_perplexity"])
                            if ppl >= config.vocab_size]
    print(json.dumps(result, indent=2))
    if args.require_live_heads and result["dead_heads"]:
        print(f"error: dead head(s) after layer(s) {result['dead_heads']}: their perplexity is >= the vocabulary size "
              f"{config.vocab_size} (per-head: {[round(p, 1) for p in result['head_perplexity']]}); see README "
              "'Routing collapse' (training.aux_head_loss)", file=sys.stderr)
        return 3
    if args.require_live_heads:
        print(f"every head alive: perplexities {[round(p, 1) for p in result['head_perplexity']]} < vocabulary size "
              f"{config.vocab_size}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
