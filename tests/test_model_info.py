"""Parameter accounting on the meta device, the matched dense twins and the model_info CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nvium_dist.config import load_config
from nvium_dist.model_info import dense_twin, matched_dense_ffn, model_state_memory, parameter_breakdown

CONFIGS = Path(__file__).resolve().parents[1] / "pretrain" / "configs"


def test_paper_1_5b_count_and_parts():
    config = load_config(CONFIGS / "nvium-1.5b.yaml").model
    counts = parameter_breakdown(config)
    assert abs(counts["total"] - 1.486e9) / 1.486e9 < 0.005
    d, L, V = 1536, 48, 32000
    assert counts["parts"]["embedding"] == V * d == counts["parts"]["output"]
    assert counts["parts"]["blocks"] == L * (4 * d * d + 3 * d * 4096 + 2 * d)
    assert counts["parts"]["adapters"] == 4 * 2 * d * d


@pytest.mark.parametrize("nvium, dense", [("tiny", "tiny-dense"), ("d768-l24", "d768-l24-dense"),
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
    assert {k: v for k, v in vars(twin).items() if k not in ("exits", "ffn_hidden_size")} == \
        {k: v for k, v in vars(model).items() if k not in ("exits", "ffn_hidden_size")}


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
