"""Between one full (TP=1, unpadded-vocab) state dict and a tensor-parallel shard of NviumModel.

The full form is what exports hold and what every layout converts through: vocab rows are stored
unpadded, so a checkpoint does not depend on the TP size it was trained with. Only parameters are
carried (megatron's linears add `_extra_state` entries to state_dict that hold nothing here).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

VOCAB_PARAMETERS = ("embedding.weight", "output.weight")


def partition_dims(model: nn.Module) -> dict[str, int | None]:
    """Parameter name -> the dimension TP splits (None: replicated on every TP rank)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    dims: dict[str, int | None] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
                dims[name] = 0
            elif isinstance(module, RowParallelLinear):
                dims[name] = 1 if param_name == "weight" else None
            else:
                dims[name] = None
    return dims


def _is_vocab(name: str) -> bool:
    return name.endswith(VOCAB_PARAMETERS)


def shard_named(params: dict[str, torch.Tensor], dims: dict[str, int | None], full: dict[str, torch.Tensor],
                tp_rank: int, tp_size: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """The slices of `full` that the TP-rank-local `params` (by full name) hold, vocab rows padded first."""
    missing = sorted(set(params) - set(full))
    if missing:
        raise ValueError(f"state dict does not match the model: missing {missing[:8]}")
    shards = {}
    for name, local in params.items():
        tensor = full[name]
        if _is_vocab(name):
            if tensor.shape[0] != vocab_size:
                raise ValueError(f"{name} has {tensor.shape[0]} vocab rows, the model config says {vocab_size}")
            padded_rows = local.shape[0] * tp_size
            tensor = torch.cat([tensor, tensor.new_zeros(padded_rows - vocab_size, *tensor.shape[1:])])
        dim = dims.get(name)
        if dim is not None:
            tensor = tensor.chunk(tp_size, dim=dim)[tp_rank]
        if tensor.shape != local.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit the model's {tuple(local.shape)}")
        shards[name] = tensor.contiguous()
    return shards


def read_shards(path, params: dict[str, torch.Tensor], dims: dict[str, int | None], tp_rank: int, tp_size: int,
                vocab_size: int, prefix: str = ""):
    """Yields (name, this TP rank's slice of tensor `prefix + name` of the safetensors file `path`), one
    parameter at a time and reading only that slice (vocab rows padded), so that a resume into a new layout
    never holds more than one of this rank's tensors on top of the model. `params`: the TP-local tensors (or
    anything with their shape) by full name."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        for name, local in params.items():
            key = prefix + name
            if key not in stored:
                raise ValueError(f"{path} does not match the model: {key} is missing")
            piece = f.get_slice(key)
            full_shape = list(piece.get_shape())
            dim = dims.get(name) if tp_size > 1 else None
            expected = list(local.shape)
            if dim is not None:
                expected[dim] *= tp_size
            if _is_vocab(name):
                if full_shape[0] != vocab_size:
                    raise ValueError(f"{key} has {full_shape[0]} vocab rows, the model config says {vocab_size}")
                full_shape[0] = expected[0]  # compared padded; the padding rows are zeros
            if full_shape != expected:
                raise ValueError(f"{key}: shape {tuple(full_shape)} does not fit the model's {tuple(local.shape)}")
            if dim is None:
                begin, end = 0, local.shape[0]
            else:
                begin, end = tp_rank * local.shape[dim], (tp_rank + 1) * local.shape[dim]
            if dim == 1:
                tensor = piece[:, begin:end]
            else:
                stop = min(end, vocab_size) if _is_vocab(name) else end
                tensor = piece[begin:stop] if stop > begin else torch.empty(0, *local.shape[1:])
                if tensor.shape[0] < local.shape[0]:
                    tensor = torch.cat([tensor, tensor.new_zeros(local.shape[0] - tensor.shape[0], *local.shape[1:])])
            yield name, tensor.contiguous()


def load_named_from_file(params: dict[str, torch.Tensor], dims: dict[str, int | None], path, tp_rank: int,
                         tp_size: int, vocab_size: int) -> None:
    """Copies this TP rank's slices of the safetensors file `path` into `params`, one tensor at a time."""
    with torch.no_grad():
        for name, shard in read_shards(path, params, dims, tp_rank, tp_size, vocab_size):
            params[name].copy_(shard)


def gather_named(params: dict[str, torch.Tensor], dims: dict[str, int | None], vocab_size: int,
                 tp_group=None) -> dict[str, torch.Tensor]:
    """All-gathers TP shards (by full name) into full tensors on CPU, vocab padding stripped."""
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    full = {}
    for name, param in params.items():
        tensor = param.detach()
        dim = dims.get(name)
        if dim is not None and tp_size > 1:
            pieces = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(pieces, tensor.contiguous(), group=tp_group)
            tensor = torch.cat(pieces, dim=dim)
        if _is_vocab(name):
            tensor = tensor[:vocab_size]
        full[name] = tensor.cpu().contiguous()
    return full


def shard_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                          vocab_size: int) -> dict[str, torch.Tensor]:
    """The slice of a full state dict that TP rank `tp_rank` of `tp_size` holds (vocab rows padded first)."""
    params = dict(model.named_parameters())
    unexpected = sorted(set(full) - set(params))
    if unexpected:
        raise ValueError(f"state dict does not match the model: unexpected {unexpected[:8]}")
    return shard_named(params, partition_dims(model), full, tp_rank, tp_size, vocab_size)


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], tp_rank: int = 0, tp_size: int = 1) -> None:
    shards = shard_full_state_dict(model, full, tp_rank, tp_size, model.config.vocab_size)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(shards[name])


def gather_full_state_dict(model: nn.Module, tp_group=None) -> dict[str, torch.Tensor]:
    """All-gathers this TP group's shards into the full state dict (vocab padding stripped), on CPU."""
    return gather_named(dict(model.named_parameters()), partition_dims(model), model.config.vocab_size, tp_group)
