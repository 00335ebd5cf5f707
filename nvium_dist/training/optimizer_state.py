"""Adam moments in a layout-independent form, so a run keeps its optimizer across TP/PP/ZeRO/world changes.

DeepSpeed's own optimizer files are flat partitions that only the layout which wrote them can read.
Next to them a checkpoint holds `optimizer.safetensors`: for every parameter of the full (TP=1,
vocab rows unpadded) model, `exp_avg.<name>` and `exp_avg_sq.<name>` in fp32, and the Adam step count
in the metadata. Every rank writes its own ZeRO fragment of them (training/sharded_state.py); a resume
in another layout reads each rank's TP slices (tp_layout.read_shards) and hands them to DeepSpeed's
`safe_set_full_optimizer_state`, one parameter at a time.
"""
from __future__ import annotations

import torch

from nvium_dist.tp_layout import read_shards

MOMENTS = ("exp_avg", "exp_avg_sq")


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state (DeepSpeed's ZeRO and bf16 wrappers keep it as `.optimizer`)."""
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _deepspeed_managed(param) -> bool:
    """True when DeepSpeed keeps this parameter's fp32 state in flat partitions of its own (ZeRO, bf16);
    a parameter wholly in another rank's ZeRO partition has `_hp_mapping` None and takes part all the same."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _map_state_slices(engine) -> None:
    """ZeRO-1/2 and bf16 map each parameter to its slice of the flat optimizer state once, right after the
    first optimizer step of the first param group, when the other groups have no state yet: their
    parameters end up without moments ("exp_avg not found"). Map again now that every group has state."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def adam_step(engine) -> int:
    """The optimizer's step count (Adam's bias correction depends on it); 0 before the first step."""
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0  # (the state is a defaultdict: DeepSpeed's look-ups may leave empty entries)


def _optimizer_tensors(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer updates: ZeRO-3's flat fp32 partitions (it hands them to the optimizer
    one sub-group at a time, so its param groups are empty between steps), else its param groups' tensors."""
    zero3 = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if zero3 is not None:
        return list(zero3)
    return [p for group in _inner_optimizer(engine).param_groups for p in group["params"]]


def _create_adam_state(engine, step: int) -> None:
    """The state torch's Adam/AdamW builds lazily at its first step, built now so it can be filled in."""
    inner = _inner_optimizer(engine)
    # torch's fused and capturable AdamW read `step` on the parameters' device; the others on the CPU
    on_device = any(group.get("fused") or group.get("capturable") for group in inner.param_groups)
    for p in _optimizer_tensors(engine):
        state = inner.state[p]
        if not all(k in state for k in MOMENTS):
            state.update({key: torch.zeros_like(p, memory_format=torch.preserve_format) for key in MOMENTS})
        state["step"] = torch.tensor(float(step), device=p.device if on_device else "cpu")
    _map_state_slices(engine)


def load_moments(engine, params: dict, dims: dict, path, step: int, tp_rank: int, tp_size: int,
                 vocab_size: int) -> None:
    """Sets this rank's share of the Adam moments and step count from a checkpoint's optimizer.safetensors
    (`path`), reading one TP slice at a time."""
    from deepspeed.utils import safe_set_full_optimizer_state

    _create_adam_state(engine, step)
    inner = _inner_optimizer(engine)
    # ZeRO-3 parameters are partitioned in place; their shape as the model sees it is ds_shape
    shapes = {name: torch.empty(getattr(p, "ds_shape", p.shape), device="meta") for name, p in params.items()}
    for key in MOMENTS:
        for name, shard in read_shards(path, shapes, dims, tp_rank, tp_size, vocab_size, prefix=f"{key}."):
            param = params[name]
            if _deepspeed_managed(param):
                safe_set_full_optimizer_state(param, shard.to(param.device), key)
            else:
                inner.state[param][key].copy_(shard)
