"""The lean single-process path (parallel.lean_single_process): DeepSpeed without the bookkeeping that does
nothing when one fp32 process trains alone.

At world size 1 ZeRO has nothing to partition, yet stage 1-3 keep flat fp32 copies and (2, 3) hook every
parameter's gradient; the config runs ZeRO-0 instead (ParallelConfig.engine_zero_stage). ZeRO-0 still
flattens, "all-reduces" over one rank and unflattens every gradient at each step, and DeepSpeed's fp32 clip
drops the gradient norm it computes; `make_lean` turns the first off and keeps the second for the metrics.
"""
from __future__ import annotations


def make_lean(engine) -> None:
    """Adjusts a ZeRO-0 DeepSpeed engine of a one-process run in place."""
    from deepspeed.runtime.utils import clip_grad_norm_

    engine.enable_backward_allreduce = False

    def clip_fp32_gradients():
        engine._global_grad_norm = float(clip_grad_norm_(parameters=engine.module.parameters(),
                                                         max_norm=engine.gradient_clipping(), mpu=engine.mpu))

    engine.clip_fp32_gradients = clip_fp32_gradients
