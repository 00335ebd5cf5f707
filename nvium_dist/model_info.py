"""Parameter accounting on the meta device (no weights allocated), the parameter-matched dense
baseline, and DeepSpeed's per-GPU memory estimate for model states."""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import torch

from nvium_dist.config import ModelConfig


def _meta_model(config: ModelConfig):
    from nvium_dist.model import NviumModel

    with torch.device("meta"):
        return NviumModel(config, tensor_parallel=1, initialise=False)


def _part(name: str) -> str:
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("layers."):
        return "blocks"
    if name.startswith("output."):
        return "output"
    if ".router." in name:
        return "routers"
    if ".adapter." in name:
        return "adapters"
    return "exit_norms"


def parameter_breakdown(config: ModelConfig) -> dict:
    """Total and per-part parameter counts, and the largest single module (for the ZeRO-3 estimate)."""
    model = _meta_model(config)
    parts = OrderedDict((p, 0) for p in ("embedding", "blocks", "exit_norms", "adapters", "routers", "output"))
    for name, param in model.named_parameters():
        parts[_part(name)] += param.numel()
    # counts use the unpadded vocab: padding rows are an artefact of the TP layout, not of the model
    padding_rows = model.padded_vocab_size - config.vocab_size
    parts["embedding"] -= padding_rows * config.hidden_size
    parts["output"] -= padding_rows * config.hidden_size
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"total": sum(parts.values()), "parts": dict(parts), "largest_module": largest}


def dense_twin(config: ModelConfig, ffn_hidden_size: int | None = None) -> ModelConfig:
    return dataclasses.replace(config, exits=[], ffn_hidden_size=ffn_hidden_size or config.ffn_hidden_size)


def matched_dense_ffn(config: ModelConfig) -> int:
    """Smallest multiple of 8 MLP width whose dense model has at least as many parameters as `config`."""
    target = parameter_breakdown(config)["total"]
    at_8 = parameter_breakdown(dense_twin(config, 8))["total"]
    per_unit = (parameter_breakdown(dense_twin(config, 16))["total"] - at_8) / 8  # parameters per MLP unit
    width = max(8, 8 + 8 * math.ceil((target - at_8) / per_unit / 8))
    while width > 8 and at_8 + per_unit * (width - 8 - 8) >= target:
        width -= 8
    return width


def model_state_memory(total_params: int, largest_module: int, zero_stage: int, gpus_per_node: int,
                       nodes: int, model_parallel: int = 1, offload: bool = False) -> dict:
    """Per-GPU bytes for parameters, gradients and AdamW states in bf16 mixed precision.

    ZeRO 1-3 use DeepSpeed's own estimators over the parameters one model-parallel rank holds;
    stage 0 keeps everything on every GPU (2+2 bytes bf16 params/grads, 16 bytes fp32 master + Adam).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_rank = total_params // model_parallel
    data_parallel_gpus = max(1, gpus_per_node * nodes // model_parallel)
    if zero_stage == 0:
        gpu, cpu = 20 * per_rank, 0
    elif zero_stage in (1, 2):
        cpu, gpu = estimate_zero2_model_states_mem_needs(per_rank, data_parallel_gpus, 1, cpu_offload=offload)
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            per_rank, largest_module // model_parallel, data_parallel_gpus, 1, cpu_offload=offload,
            cpu_offload_params=offload)
    return {"zero_stage": zero_stage, "gpus": gpus_per_node * nodes, "model_parallel": model_parallel,
            "offload": offload, "per_gpu_gib": round(gpu / 2**30, 3), "cpu_gib": round(cpu / 2**30, 3)}


def model_report(config: ModelConfig) -> dict:
    """What tools/model_info.py prints: counts per part, exits, segments and the matched dense twin."""
    counts = parameter_breakdown(config)
    report = {
        "total_parameters": counts["total"],
        "total_parameters_billions": round(counts["total"] / 1e9, 4),
        "parameters_by_part": counts["parts"],
        "largest_module_parameters": counts["largest_module"],
        "num_layers": config.num_layers,
        "exits": list(config.exits),
        "exit_layers": config.exit_layers,
        "segments": [list(r) for r in config.segment_ranges],
    }
    if config.exits:
        width = matched_dense_ffn(config)
        report["matched_dense"] = {"ffn_hidden_size": width,
                                   "total_parameters": parameter_breakdown(dense_twin(config, width))["total"]}
    return report
