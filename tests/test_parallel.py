"""Rank layout: megatron-core parallel_state and DeepSpeed's pipe/data/model topology must agree."""
import pytest

from distributed_runner import run_distributed
from nvium_dist.config import ParallelConfig


def _layout_worker(rank, world_size, tp, pp):
    from nvium_dist.parallel import check_rank_layout, init_distributed

    info = init_distributed(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    check_rank_layout(info)
    return info.tp_rank, info.pp_rank, info.dp_rank


@pytest.mark.parametrize("tp, pp", [(2, 2), (1, 4), (4, 1), (2, 1)])
def test_megatron_and_deepspeed_layouts_agree(tp, pp):
    coords = run_distributed(_layout_worker, 4, tp, pp)
    # megatron: tensor-parallel fastest, then data, then pipeline
    dp = 4 // (tp * pp)
    expected = [(r % tp, r // (tp * dp), (r // tp) % dp) for r in range(4)]
    assert coords == expected
