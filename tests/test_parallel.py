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


def _collectives_worker(rank, world_size):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nvium_dist.parallel import all_reduce, broadcast_object, collective_device, init_distributed

    init_distributed(ParallelConfig())
    totals = torch.tensor([1.0 + rank, 10.0 * rank], dtype=torch.float64)
    returned = all_reduce(totals, group=parallel_state.get_data_parallel_group())
    flag = all_reduce(torch.tensor([float(rank == 1)]), op=dist.ReduceOp.MAX)
    return {"same_object": returned is totals, "totals": totals.tolist(), "flag": flag.item(),
            "device": str(collective_device()), "from_0": broadcast_object({"beta": 0.5 + rank}, src=0),
            "from_1": broadcast_object([rank], src=1)}


def test_collective_helpers_on_gloo():
    results = run_distributed(_collectives_worker, 2)
    for result in results:
        assert result["same_object"] and result["totals"] == [3.0, 10.0] and result["flag"] == 1.0
        assert result["device"] == "cpu" and result["from_0"] == {"beta": 0.5} and result["from_1"] == [1]


def test_gpu_process_group_has_a_host_backend():
    from nvium_dist.parallel import process_group_backend

    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl" and process_group_backend("cpu") == "gloo"


# Reductions and broadcasts whose NCCL versions accept only CUDA tensors: outside parallel.py they must go
# through parallel.all_reduce / broadcast_object, which run them on the group's device.
HOST_UNSAFE = {"all_reduce", "reduce", "broadcast", "broadcast_object_list", "all_reduce_coalesced", "reduce_scatter",
               "all_reduce_multigpu", "broadcast_multigpu"}


def _direct_collective_calls(path):
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {"torch.distributed"}  # names bound to torch.distributed in this file
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{path}:{node.lineno} imports {a.name}" for a in node.names if a.name in HOST_UNSAFE]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in HOST_UNSAFE:
            if ast.unparse(node.func.value) in aliases:
                found.append(f"{path}:{node.lineno} calls {ast.unparse(node.func)}")
    return found


def test_no_direct_reductions_outside_parallel_py(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [p for folder in ("nvium_dist", "tools", "pretrain") for p in (root / folder).rglob("*.py")]
    offenders = [hit for p in files if p != root / "nvium_dist" / "parallel.py" for hit in _direct_collective_calls(p)]
    assert not offenders, "use nvium_dist.parallel.all_reduce / broadcast_object:\n" + "\n".join(offenders)
    # the check itself finds both spellings
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\nimport torch\ndist.all_reduce(x)\n"
                   "torch.distributed.broadcast(x, 0)\nfrom torch.distributed import reduce\n")
    assert len(_direct_collective_calls(bad)) == 3
