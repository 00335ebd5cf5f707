"""Per-rank extra memory of a checkpoint save and of a resume into a new layout, against the lean target.

The target (issue 18): no rank allocates more than 1.25 x its own shard of the training state (12 bytes
per parameter: fp32 master and two Adam moments, of its TP-local stage parameters divided over its ZeRO
data-parallel group) plus the largest single tensor. Counted with `model_info.ExtraMemory` (storages
freed again, plus the Python heap), so reuse cannot hide anything and the numbers are the same on any
machine. Used by tools/bench_checkpoint.py and the tests.
"""
from __future__ import annotations

import math

STATE_BYTES_PER_PARAMETER = 12  # fp32 master weight + Adam exp_avg + exp_avg_sq


def own_shard_bytes(trainer) -> int:
    params, _ = trainer._named_parameters(trainer.engine.module)
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in params.values())
    return STATE_BYTES_PER_PARAMETER * numel // trainer.info.dp_size


def largest_tensor_bytes(model_config) -> int:
    from nvium_dist.checkpoint_io import expected_parameter_shapes

    return max(4 * math.prod(shape) for shape in expected_parameter_shapes(model_config).values())


def measured_training(config_path: str | None, overrides: list[str]) -> dict:
    """Runs the real trainer (resuming when the run directory has a checkpoint) with every synchronous save
    and every step of a resume into a new layout counted. -> this rank's figures in bytes: `save` and
    `resume` (the largest of each; `parts`: its torch and Python-heap shares), `shard`, `largest_tensor`,
    `bound` (the target), `rank`."""
    from nvium_dist import tp_layout
    from nvium_dist.config import load_config
    from nvium_dist.model_info import ExtraMemory
    from nvium_dist.training import checkpoint as ckpt
    from nvium_dist.training.trainer import Trainer

    ExtraMemory.start_tracing()  # before the trainer starts its threads (see ExtraMemory)
    peaks = {"save": 0, "resume": 0}
    parts = {}

    def counted(kind, function):
        def run(*args, **kwargs):
            with ExtraMemory() as extra:
                result = function(*args, **kwargs)
            if extra.bytes > peaks[kind]:
                peaks[kind], parts[kind] = extra.bytes, {"torch": extra.torch_bytes, "python": extra.python_bytes}
            return result
        return run

    originals = (ckpt.save_checkpoint, tp_layout.load_named_from_file, ckpt.load_fp32_master_weights,
                 Trainer._load_optimizer_moments)
    ckpt.save_checkpoint = counted("save", originals[0])
    tp_layout.load_named_from_file = counted("resume", originals[1])
    ckpt.load_fp32_master_weights = counted("resume", originals[2])
    Trainer._load_optimizer_moments = counted("resume", originals[3])
    try:
        config = load_config(config_path, overrides)
        trainer = Trainer(config)
        trainer.train()
    finally:
        (ckpt.save_checkpoint, tp_layout.load_named_from_file, ckpt.load_fp32_master_weights,
         Trainer._load_optimizer_moments) = originals
    shard, largest = own_shard_bytes(trainer), largest_tensor_bytes(config.model)
    return {"rank": trainer.info.rank, **peaks, "shard": shard, "largest_tensor": largest,
            "bound": int(1.25 * shard) + largest, "parts": parts}
