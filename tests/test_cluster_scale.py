"""Cluster-scale settings, shown on CPU with real gloo ranks: the dtype of DeepSpeed's gradient reduction,
overlapped ZeRO buckets, the optimizer choice, run-directory locks without flock, start-up data checks."""
import pytest
import torch

from distributed_runner import run_distributed


def _reduction_dtype_worker(rank, world_size, grad_reduce_dtype, zero_stage):
    """A bf16 ZeRO engine built from the trainer's DeepSpeed config: its communication dtype, and the dtypes
    of the floating-point reductions one training step really runs."""
    import sys

    import deepspeed
    import torch.distributed as dist

    from nvium_dist.config import ModelConfig, NviumConfig, ParallelConfig
    from nvium_dist.model import NviumModel
    from nvium_dist.parallel import DeepSpeedMPU, init_distributed
    from nvium_dist.training.engine_config import deepspeed_config

    parallel = ParallelConfig(dtype="bf16", zero_stage=zero_stage, grad_reduce_dtype=grad_reduce_dtype)
    config = NviumConfig(model=ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                                           ffn_hidden_size=96, exits=[1], seq_length=16,
                                           make_vocab_size_divisible_by=64), parallel=parallel)
    config.training.micro_batch_size = 2
    init_distributed(parallel)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    model = NviumModel(config.model, seed=1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                      mpu=DeepSpeedMPU(), config=deepspeed_config(config, grad_accumulation=1))
    reduced = set()
    for name in ("all_reduce", "reduce", "reduce_scatter_tensor"):
        original = getattr(dist, name)

        def spy(tensor, *args, _original=original, **kwargs):
            if tensor.is_floating_point() and tensor.numel() > 1:
                reduced.add(str(tensor.dtype))
            return _original(tensor, *args, **kwargs)

        setattr(dist, name, spy)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    terms = engine(tokens, tokens)
    engine.backward(-terms.log_p_mix.float().mean())
    engine.step()
    return {"engine": str(engine.communication_data_type), "zero": str(getattr(engine.optimizer, "communication_data_type", engine.communication_data_type)),
            "reduced": sorted(reduced)}


@pytest.mark.parametrize("zero_stage", [1, 2])
@pytest.mark.parametrize("grad_reduce_dtype", ["fp32", "bf16"])
def test_gradient_reduction_runs_in_the_configured_dtype(grad_reduce_dtype, zero_stage):
    """bf16 training reduces gradients in fp32 by default (DeepSpeed's own default is the model dtype);
    parallel.grad_reduce_dtype=bf16 asks for bf16 reductions and gets them."""
    expected = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[grad_reduce_dtype]
    for result in run_distributed(_reduction_dtype_worker, 2, grad_reduce_dtype, zero_stage):
        assert result["engine"] == expected
        assert result["zero"] == expected
        assert expected in result["reduced"], result
        if grad_reduce_dtype == "fp32":
            assert "torch.bfloat16" not in result["reduced"], result
