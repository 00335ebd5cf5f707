"""Parameter names between nvium's full state dict and transformers' LLaMA layout, and reading
transformers directories (config.json + safetensors, single file or sharded) without unpickling.

nvium keeps each layer's attention input projection as one matrix `attn.qkv.weight` [3d, d] whose rows are
head-major [head, (q, k, v), head_dim] (so a tensor-parallel split hands each rank whole heads);
transformers keeps q_proj / k_proj / v_proj [d, d] separately. Everything else is a rename.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from nvium_dist.checkpoint_io import CheckpointError, check_safetensors, load_tensors, read_json_object
from nvium_dist.output_dir import verify_marker

# nvium name inside layers.{i} -> transformers name inside model.layers.{i}
LAYER_RENAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.out.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
QKV = ("q_proj", "k_proj", "v_proj")


def backbone_to_llama(state: dict[str, torch.Tensor], num_layers: int, num_heads: int) -> dict[str, torch.Tensor]:
    """nvium embedding + layers -> transformers `model.embed_tokens` + `model.layers.*` (heads not included)."""
    out = {"model.embed_tokens.weight": state["embedding.weight"]}
    for i in range(num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for name, hf_name in LAYER_RENAMES.items():
            out[theirs + hf_name] = state[ours + name]
        qkv = state[ours + "attn.qkv.weight"]
        d = qkv.shape[1]
        per_head = qkv.view(num_heads, 3, d // num_heads, d)
        for j, part in enumerate(QKV):
            out[f"{theirs}self_attn.{part}.weight"] = per_head[:, j].reshape(d, d).contiguous()
    return out


def backbone_from_llama(hf_state: dict[str, torch.Tensor], num_layers: int, num_heads: int
                        ) -> dict[str, torch.Tensor]:
    """The inverse of `backbone_to_llama`."""
    out = {"embedding.weight": hf_state["model.embed_tokens.weight"]}
    for i in range(num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for name, hf_name in LAYER_RENAMES.items():
            out[ours + name] = hf_state[theirs + hf_name]
        q, k, v = (hf_state[f"{theirs}self_attn.{part}.weight"] for part in QKV)
        d = q.shape[1]
        out[ours + "attn.qkv.weight"] = torch.stack(
            [m.view(num_heads, d // num_heads, d) for m in (q, k, v)], dim=1).reshape(3 * d, d).contiguous()
    return out


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass a transformers model directory")
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; it is not a transformers model directory")
    verify_marker(Path(directory))  # a directory convert_to_hf.py wrote: its files are still the ones it wrote
    return read_json_object(path)


def hf_weight_files(directory: str | os.PathLike) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json lists."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map of tensor -> file)")
        return [directory / shard for shard in sorted(set(weight_map.values()))]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = (f" It has {pickled[:3]}: pickled weights are not read (they can run code); re-save the model with "
            "`model.save_pretrained(DIR)` (safetensors is the default)") if pickled else ""
    raise CheckpointError(f"{directory} has no model.safetensors or model.safetensors.index.json.{hint}")


def read_hf_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, from the safetensors headers alone: no tensor data is read, so sizes can be
    checked against config.json before gigabytes are."""
    shapes = {}
    for path in hf_weight_files(directory):
        for name, info in check_safetensors(path).items():
            if name == "__metadata__":
                continue
            shape = info.get("shape") if isinstance(info, dict) else None
            if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
                raise CheckpointError(f"{path}: tensor {name!r} has no valid shape in its header; the file is corrupt")
            shapes[name] = tuple(shape)
    return shapes


def read_hf_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or of the shards model.safetensors.index.json lists."""
    state = {}
    for path in hf_weight_files(directory):
        state.update(load_tensors(path))
    return state


def rope_theta(hf_config: dict) -> float:
    """RoPE base from a transformers config (v5 `rope_parameters` or v4 `rope_theta`); only plain RoPE."""
    parameters = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    kind = parameters.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise CheckpointError(f"RoPE scaling type {kind!r} is not supported by nvium (plain RoPE only)")
    return float(parameters.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
