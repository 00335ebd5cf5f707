#!/usr/bin/env python
"""Export a training checkpoint (any TP/PP/ZeRO layout) to one inference directory, or reshard it.

    python tools/export_checkpoint.py --checkpoint runs/tiny --output exports/tiny
    python tools/export_checkpoint.py --checkpoint runs/tiny/checkpoints/step_00000300 --output exports/tiny
    python tools/export_checkpoint.py --checkpoint runs/tiny --output runs/tiny-tp2 --tp 2 --pp 1   # reshard

An export holds config.json, model.safetensors (full weights) and tokenizer.model. Resharding writes
OUTPUT/checkpoints/step_X/ (+ latest) for another tensor/pipeline-parallel layout, without DeepSpeed state:
the trainer resumes from its weights and Adam moments (optimizer.safetensors). Both check themselves
before they replace anything: the written model's log-probabilities on the checkpoint's sample batch,
computed in the dtype the run trained in, are compared with those the training model computed (tolerance
1e-4 for fp32, 0.1 for bf16). A bf16 sample from GPU kernels rounds differently, more so with depth: then
the reference is the same weights in fp32 arithmetic, within twice the bf16 rounding measured against it. --output may
name a new path, an empty directory or an earlier export of this tool (replaced only after the check passes);
files it did not write are never replaced (not even with --force, which only replaces an earlier export changed
since or written by an older version), and the checkpoint's own run directory is never written.
"""
from __future__ import annotations

import argparse
import sys
import time

from nvium_dist.cli import float_at_least, int_at_least

# least max |difference| allowed in the self-check's log-probabilities, by the dtype the run trained in (bf16:
# widened to twice the rounding measured on the checkpoint itself, see self_check)
SELF_CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="RUN_DIR (uses checkpoints/latest), RUN_DIR/checkpoints, or a step directory")
    parser.add_argument("--output", required=True, help="export directory (or, with --tp/--pp, the new RUN_DIR)")
    parser.add_argument("--tp", type=int_at_least(1), default=None,
                        help="reshard: tensor-parallel size of the new checkpoint")
    parser.add_argument("--pp", type=int_at_least(1), default=None,
                        help="reshard: pipeline-parallel size of the new checkpoint")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer for the export: a SentencePiece .model path, 'bytes' or 'none' "
                             "(default: the checkpoint's data.tokenizer_model or RUN_DIR/data/tokenizer.model)")
    parser.add_argument("--tolerance", type=float_at_least(0), default=None,
                        help="max allowed |difference| of the self-check log-probabilities (default by the dtype "
                             f"the run trained in: {SELF_CHECK_TOLERANCE})")
    parser.add_argument("--no-check", action="store_true", help="skip the self-check forward pass")
    parser.add_argument("--force", action="store_true",
                        help="export: replace an earlier export of this tool even where its files were changed "
                             "since; never a file or directory it did not write")
    return parser.parse_args(argv)


def _log_probs(model_config, full_state, sample, weight_dtype, compute_dtype):
    """(log p_heads, log p_mix) in fp32 of a fresh model with `full_state` rounded to `weight_dtype` (what
    the training module held), run in `compute_dtype`."""
    import torch

    from nvium_dist.model import NviumModel
    from nvium_dist.tp_layout import load_full_state_dict

    model = NviumModel(model_config, tensor_parallel=1, dtype=compute_dtype, initialise=False)
    load_full_state_dict(model, {k: v.to(weight_dtype).to(compute_dtype) for k, v in full_state.items()})
    model.eval()
    with torch.no_grad():
        terms = model(sample["tokens"].long(), sample["labels"].long())
    return terms.log_p_heads.float(), terms.log_p_mix.float()


def self_check(model_config, full_state, sample, tolerance: float | None, what: str, dtype_name: str) -> float:
    """A fresh model loaded with `full_state` on the sample batch vs the training model's values, first in the
    dtype the training model ran in (the fp32 masters rounded as its module weights were). A bf16 sample from
    other kernels (GPU vs this CPU) carries their own rounding, which grows with depth: if the first comparison
    misses, the reference becomes the same weights in fp32 arithmetic and the tolerance (unless given) twice
    the rounding that bf16 arithmetic shows here against it, at least SELF_CHECK_TOLERANCE. Wrong weights miss
    by far more; another kernel's rounding does not."""
    import torch

    from nvium_dist.checkpoint_io import CheckpointError
    from nvium_dist.inference.generator import ensure_process_group

    ensure_process_group("cpu")
    dtype = getattr(torch, dtype_name)

    def differences(heads, mix):
        return ((heads - sample["log_p_heads"].float()).abs().max().item(),
                (mix - sample["log_p_mix"].float()).abs().max().item())

    low = _log_probs(model_config, full_state, sample, dtype, dtype)
    heads, mix = differences(*low)
    limit = SELF_CHECK_TOLERANCE[dtype_name] if tolerance is None else tolerance
    how = f"in {dtype_name}"
    if max(heads, mix) > limit and dtype != torch.float32:
        exact = _log_probs(model_config, full_state, sample, dtype, torch.float32)
        rounding = max((a - b).abs().max().item() for a, b in zip(low, exact))
        heads, mix = differences(*exact)
        limit = max(limit, 2 * rounding) if tolerance is None else tolerance
        how = f"{dtype_name} weights in fp32 arithmetic, against which {dtype_name} arithmetic moves {rounding:.3e}"
    worst = max(heads, mix)
    print(f"self-check ({what}): max |diff| of log p_heads {heads:.3e}, log p_mix {mix:.3e} over "
          f"{tuple(sample['tokens'].shape)} sample tokens {how} (tolerance {limit:.3g})", flush=True)
    if not worst <= limit:
        raise CheckpointError(f"the {what} does not reproduce the training model's log-probabilities "
                              f"(max diff {worst:.3e} > {limit:.3g}); nothing was replaced: the checkpoint's "
                              "weights and sample do not belong together (--tolerance overrides the check)")
    return worst


def main(argv=None) -> int:
    args = parse_args(argv)
    reshard = args.tp is not None or args.pp is not None
    from nvium_dist.checkpoint_io import (CheckpointError, find_tokenizer, load_export, read_checkpoint,
                                          resolve_checkpoint_dir, run_dir_of, save_export, write_resharded_checkpoint)

    start = time.time()
    try:
        step_dir = resolve_checkpoint_dir(args.checkpoint)
        print(f"reading {step_dir}", flush=True)
        config, full_state, sample, trainer_state = read_checkpoint(step_dir)
        n_params = sum(t.numel() for t in full_state.values())
        print(f"  model: {config.model.num_layers} layers, d={config.model.hidden_size}, exits={config.model.exits}, "
              f"vocab={config.model.vocab_size}, {n_params:,} parameters; trained layout TP={config.parallel.tensor_parallel} "
              f"PP={config.parallel.pipeline_parallel} ZeRO-{config.parallel.zero_stage}; step {trainer_state.get('step', '?')}",
              flush=True)
        checking = sample is not None and not args.no_check
        dtype_name = config.parallel.torch_dtype_name
        tolerance = args.tolerance  # None: by the dtype and the measured rounding (self_check)
        if sample is None:
            print("  warning: the checkpoint has no sample_check.safetensors; the self-check is skipped", flush=True)
        if reshard:
            tp = args.tp if args.tp is not None else config.parallel.tensor_parallel
            pp = args.pp if args.pp is not None else config.parallel.pipeline_parallel

            def check_reshard(tmp_step):
                new_config, new_state, _, _ = read_checkpoint(tmp_step, verified=True)  # its manifest was just written
                self_check(new_config.model, new_state, sample, tolerance, "resharded checkpoint", dtype_name)

            new_dir = write_resharded_checkpoint(args.output, step_dir, config, trainer_state, tp, pp,
                                                 check=check_reshard if checking else None)
            print(f"wrote {new_dir} for TP={tp} PP={pp} (weights and Adam moments; DeepSpeed's layout-specific state "
                  "is rebuilt by the trainer)", flush=True)
        else:
            tokenizer = args.tokenizer
            if tokenizer is None:
                found = find_tokenizer(config, step_dir)
                tokenizer = str(found) if found else None
                if found is None:
                    print("  warning: no tokenizer found (data.tokenizer_model, RUN_DIR/data/tokenizer.model); the "
                          "export takes token ids only. Pass --tokenizer PATH to include one", flush=True)
            elif tokenizer == "none":
                tokenizer = None
            metadata = {"source": str(step_dir), "step": trainer_state.get("step"),
                        "trained_layout": {"tensor_parallel": config.parallel.tensor_parallel,
                                           "pipeline_parallel": config.parallel.pipeline_parallel,
                                           "zero_stage": config.parallel.zero_stage}}

            def check_export(tmp_dir):
                export = load_export(tmp_dir)
                self_check(export.model_config, export.state, sample, tolerance, "export", dtype_name)

            save_export(args.output, config.model, full_state, tokenizer, metadata,
                        check=check_export if checking else None, force=args.force, protected=run_dir_of(step_dir))
            print(f"wrote export {args.output} (config.json, model.safetensors"
                  f"{', tokenizer.model' if tokenizer not in (None, 'bytes') else ''})", flush=True)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
