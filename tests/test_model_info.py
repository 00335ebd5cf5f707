"""Parameter accounting on the meta device, the matched dense twins and the model_info CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvium_dist.config import load_config
from nvium_dist.model_info import (activation_memory, dense_twin, matched_dense_ffn, model_state_memory,
                                   parameter_breakdown)

CONFIGS = Path(__file__).resolve().parents[1] / "pretrain" / "configs"


def test_paper_1_5b_count_and_parts():
    config = load_config(CONFIGS / "nvium-1.5b.yaml").model
    counts = parameter_breakdown(config)
    assert abs(counts["total"] - 1.486e9) / 1.486e9 < 0.005
    d, L, V = 1536, 48, 32000
    assert counts["parts"]["embedding"] == V * d == counts["parts"]["output"]
    assert counts["parts"]["blocks"] == L * (4 * d * d + 3 * d * 4096 + 2 * d)
    assert counts["parts"]["adapters"] == 4 * 2 * d * d


@pytest.mark.parametrize("nvium, dense", [("tiny", "tiny-dense"), ("grid/nvium-d768-l24", "grid/dense-d768-l24"),
                                          ("nvium-1.5b", "dense-1.5b")])
def test_dense_twin_configs_are_parameter_matched(nvium, dense):
    model = load_config(CONFIGS / f"{nvium}.yaml").model
    twin = load_config(CONFIGS / f"{dense}.yaml").model
    assert twin.exits == [] and twin.ffn_hidden_size == matched_dense_ffn(model)
    assert not twin.has_final_adapter and "adapters" in parameter_breakdown(twin)["parts"]
    assert parameter_breakdown(twin)["parts"]["adapters"] == 0  # a plain LLaMA: no adapter anywhere
    target = parameter_breakdown(model)["total"]
    assert parameter_breakdown(twin)["total"] >= target
    assert parameter_breakdown(dense_twin(model, twin.ffn_hidden_size - 8))["total"] < target
    differing = ("exits", "ffn_hidden_size", "router_hidden_width")  # a dense model has no router
    assert {k: v for k, v in vars(twin).items() if k not in differing} == \
        {k: v for k, v in vars(model).items() if k not in differing}


def test_memory_estimate_shrinks_with_zero_stage():
    estimates = [model_state_memory(1_485_643_749, 49_152_000, stage, 4, 1)["per_gpu_gib"] for stage in (0, 2, 3)]
    assert estimates[0] > estimates[1] > estimates[2]


def test_model_info_cli_prints_json():
    out = subprocess.run([sys.executable, "tools/model_info.py", "--config", str(CONFIGS / "nvium-1.5b.yaml"),
                          "--zero-stage", "3", "--gpus", "4"], capture_output=True, text=True, check=True,
                         cwd=CONFIGS.parents[1]).stdout
    report = json.loads(out)
    assert report["segments"] == [[0, 12], [12, 24], [24, 36], [36, 48]]
    assert report["matched_dense"]["ffn_hidden_size"] == 4224  # the paper's dense 1.5B (a plain LLaMA)
    assert report["memory_estimate"]["zero_stage"] == 3


@pytest.fixture(scope="module")
def single_process():
    from nvium_dist.config import ParallelConfig
    from nvium_dist.parallel import init_distributed

    init_distributed(ParallelConfig())


SMALL = dict(vocab_size=1000, hidden_size=96, num_layers=4, num_heads=4, ffn_hidden_size=256, exits=[1, 3],
             seq_length=160, make_vocab_size_divisible_by=64)
VOCAB_HEAVY = dict(SMALL, vocab_size=16000, hidden_size=64, ffn_hidden_size=128, make_vocab_size_divisible_by=128)


@pytest.mark.parametrize("shape, dtype, checkpointing, chunk", [
    (SMALL, torch.float32, False, 0), (SMALL, torch.float32, True, 128), (SMALL, torch.bfloat16, True, 128),
    (SMALL, torch.bfloat16, False, 0), ({**SMALL, "exits": []}, torch.float32, True, 0),
    (VOCAB_HEAVY, torch.bfloat16, False, 64), (VOCAB_HEAVY, torch.float32, True, 256),
], ids=["fp32", "fp32-checkpointed-chunked", "bf16-checkpointed-chunked", "bf16", "dense-fp32-checkpointed",
        "vocab-heavy-bf16-chunked", "vocab-heavy-fp32-checkpointed-chunked"])
def test_activation_estimate_matches_measured_memory(single_process, shape, dtype, checkpointing, chunk):
    """The estimate against the tensors one training step really allocates (counted by a dispatch mode:
    deterministic, unlike RSS): what the forward leaves for backward within 3%, the peak within 25%."""
    from nvium_dist.config import ModelConfig
    from nvium_dist.model import NviumModel
    from nvium_dist.model_info import activation_memory, measure_training_step

    config = ModelConfig(**shape)
    torch.manual_seed(0)
    model = NviumModel(config, activation_checkpointing=checkpointing, loss_chunk_tokens=chunk).to(dtype)
    tokens, labels = torch.randint(0, config.vocab_size, (2, 2, 160)).unbind(0)
    measured = measure_training_step(model, tokens, labels)
    # CPU: torch's composite RMSNorm (the fused-kernel count is for CUDA)
    estimate = activation_memory(config, 2, 160, dtype_bytes=dtype.itemsize, fused_norm=False,
                                 activation_checkpointing=checkpointing, loss_chunk_tokens=chunk)
    ratios = {k: estimate[f"{k}_bytes"] / measured[f"{k}_bytes"] for k in ("saved", "peak")}
    print(f"estimate/measured {ratios} (measured {measured})")
    assert abs(ratios["saved"] - 1) < 0.03 and abs(ratios["peak"] - 1) < 0.25


def test_memory_savers_shrink_the_1_5b_estimate_below_60_gib_on_4_gpus():
    config = load_config(CONFIGS / "nvium-1.5b.yaml")
    out = subprocess.run([sys.executable, "tools/model_info.py", "--config", str(CONFIGS / "nvium-1.5b.yaml"),
                          "--zero-stage", "2", "--gpus", "4", "--micro-batch", "16", "--activation-checkpointing",
                          "--loss-chunk-tokens", "4096"], capture_output=True, text=True,
                         check=True, cwd=CONFIGS.parents[1]).stdout
    report = json.loads(out)
    assert report["activation_estimate"]["activation_checkpointing"] and report["per_gpu_total_gib"] <= 60
    plain = activation_memory(config.model, 16, 1024)
    assert plain["peak_gib"] > 4 * report["activation_estimate"]["peak_gib"]
    without = subprocess.run([sys.executable, "tools/model_info.py", "--config", str(CONFIGS / "nvium-1.5b.yaml"),
                              "--micro-batch", "16", "--no-activation-checkpointing"], capture_output=True, text=True,
                             check=True, cwd=CONFIGS.parents[1]).stdout
    assert json.loads(without)["activation_estimate"]["activation_checkpointing"] is False  # the flag overrides the config


def test_gpu_budget_counts_what_the_allocator_estimate_leaves_out():
    from nvium_dist.model_info import CUDA_CONTEXT_GIB, gpu_memory_budget, model_state_memory, parameter_breakdown

    config = load_config(CONFIGS / "nvium-1.5b.yaml")
    budget = gpu_memory_budget(config, world_size=4, micro_batch=8, activation_checkpointing=True, loss_chunk_tokens=4096)
    parts = budget["parts_gib"]
    counts = parameter_breakdown(config.model)
    assert parts["model_states"] == model_state_memory(counts["total"], counts["largest_module"], 2, 4, 1)["per_gpu_gib"]
    # overlapped ZeRO-2 buckets: 4.5 x (25M + 25M) fp32 elements; the save gathers the largest tensor in fp32
    assert parts["deepspeed_buckets"] == round(4.5 * 50e6 * 4 / 2**30, 3)
    assert parts["save_transient"] == round(4 * 32000 * 1536 / 2**30, 3)
    assert parts["cuda_context"] == CUDA_CONTEXT_GIB and parts["nccl_buffers"] > 0 and parts["allocator_slack"] > 0
    assert budget["total_gib"] == pytest.approx(sum(parts.values()), abs=0.01)
    single = gpu_memory_budget(config, world_size=1, micro_batch=8, activation_checkpointing=True, loss_chunk_tokens=4096)
    assert single["parts_gib"]["deepspeed_buckets"] == 0  # nothing to reduce without data parallelism


def test_gpu_memory_mode_recommends_the_fastest_fit_and_the_1_5b_configs_use_it():
    """On 4 x 80 GB the 1.5B run needs no recomputation (the paper's config had activation checkpointing on);
    a small card gets a smaller micro-batch, then recomputation; a card too small gets no setting."""
    from nvium_dist.model_info import fastest_fitting_setting

    out = subprocess.run([sys.executable, "tools/model_info.py", "--config", str(CONFIGS / "nvium-1.5b.yaml"),
                          "--gpus", "4", "--gpu-memory", "79.6"], capture_output=True, text=True, check=True,
                         cwd=CONFIGS.parents[1]).stdout
    best = json.loads(out)["fastest_fitting_setting"]
    assert best["fits"] and best["total_gib"] <= 79.6 and best["recompute_overhead"] == 0
    assert not best["activation_checkpointing"] and best["loss_chunk_tokens"] == 0
    for name in ("nvium-1.5b", "dense-1.5b"):
        config = load_config(CONFIGS / f"{name}.yaml")
        fitted = fastest_fitting_setting(config, 79.6, 4)
        t = config.training
        assert (t.micro_batch_size, t.activation_checkpointing, t.loss_chunk_tokens) == (
            fitted["micro_batch"], fitted["activation_checkpointing"], fitted["loss_chunk_tokens"])
    config = load_config(CONFIGS / "nvium-1.5b.yaml")
    assert fastest_fitting_setting(config, 24.0, 4)["micro_batch"] == 2  # smaller micro-batches before recomputing
    small = fastest_fitting_setting(config, 16.0, 4)
    assert small["fits"] and small["total_gib"] <= 16.0 and small["activation_checkpointing"]
    assert small["recompute_overhead"] > 0
    assert not fastest_fitting_setting(config, 8.0, 4)["fits"]  # the model states alone take 9 GiB
