"""The DeepSpeed engine configuration for a run: batch shape, ZeRO stage and offload, dtypes of training
and of the gradient reduction, and communication overlap."""
from __future__ import annotations

from nvium_dist.config import NviumConfig


def deepspeed_config(config: NviumConfig, grad_accumulation: int, world_size: int) -> dict:
    p, t = config.parallel, config.training
    stage = p.engine_zero_stage(world_size)  # 0 on the lean single-process path
    zero = {"stage": stage}
    if stage >= 2:
        # reduce each bucket of gradients while backward computes the next; buckets far below DeepSpeed's
        # 5e8-element default, which with overlap would hold ~9 GB of buffers per GPU
        zero.update(overlap_comm=p.overlap_comm, reduce_bucket_size=p.reduce_bucket_size,
                    allgather_bucket_size=p.allgather_bucket_size)
        if stage == 3:  # stage 3 names its gather bucket differently
            zero["stage3_prefetch_bucket_size"] = zero.pop("allgather_bucket_size")
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": p.device == "cuda"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": p.device == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": p.torch_dtype_name == "bfloat16"},
        # bf16 weights and activations, but gradients accumulate over micro-batches in fp32 next to the
        # optimizer's fp32 master weights, and (grad_reduce_dtype fp32) are summed over data-parallel ranks
        # in fp32 too: DeepSpeed would otherwise reduce in the model dtype
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": p.grad_reduce_dtype,
        # with TP > 1 DeepSpeed would split the stage-to-stage tuple over the TP ranks, which it supports
        # only for a single grad-carrying tensor; ours carries the per-head terms with gradients too
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
