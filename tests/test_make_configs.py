"""pretrain/configs/ is what tools/make_configs.py writes, and its grid is the paper's."""
import re
import sys
from pathlib import Path

import pytest

from nvium_dist.config import load_config
from nvium_dist.model_info import parameter_breakdown

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "pretrain" / "configs"
sys.path.insert(0, str(REPO / "tools"))
import make_configs  # noqa: E402

# The paper's dense-baseline MLP widths (its width-depth scaling script), width -> depths 6, 12, 24, 36, 48.
PAPER_DENSE_FFN = {128: [432, 392, 368, 360, 360], 256: [864, 776, 736, 720, 712],
                   512: [1712, 1544, 1456, 1432, 1416], 768: [2568, 2312, 2184, 2136, 2120],
                   1024: [3424, 3080, 2912, 2856, 2824], 1536: [5120, 4608, 4352, 4272, 4224]}


@pytest.fixture(scope="module")
def generated():
    return make_configs.all_files()


def test_committed_configs_are_what_the_tool_writes(generated):
    on_disk = {str(p.relative_to(CONFIGS)): p.read_text() for p in CONFIGS.rglob("*.yaml")}
    assert sorted(on_disk) == sorted(generated), "a config the tool does not write, or one missing"
    edited = [name for name, text in generated.items() if on_disk[name] != text]
    assert not edited, f"edited by hand (run python tools/make_configs.py): {edited}"


def test_grid_is_the_papers(generated):
    assert len([n for n in generated if n.startswith("grid/nvium-")]) == 30
    for width, widths in PAPER_DENSE_FFN.items():
        for layers, dense_ffn in zip(make_configs.DEPTHS, widths):
            nvium = load_config(CONFIGS / f"grid/nvium-d{width}-l{layers}.yaml")
            dense = load_config(CONFIGS / f"grid/dense-d{width}-l{layers}.yaml")
            # parameter-matched exactly as the paper's table (our matched_dense_ffn wrote these)
            assert dense.model.ffn_hidden_size == dense_ffn and dense.model.exits == []
            assert nvium.model.router_hidden_size == make_configs.WIDTHS[width]["router"]
            assert nvium.model.exits == ([1, 2, 4] if layers == 6 else [layers // 4, layers // 2, 3 * layers // 4])
            t = nvium.training
            tokens = t.train_iters * t.global_batch_size * nvium.model.seq_length
            params = int(re.search(r"([\d,]+) parameters", generated[f"grid/nvium-d{width}-l{layers}.yaml"])
                         .group(1).replace(",", ""))
            assert abs(tokens / params - 20) < 0.05, (width, layers)  # 20 tokens per parameter
    # spot-check the comment's parameter count against a fresh count
    config = load_config(CONFIGS / "grid/nvium-d128-l24.yaml").model
    assert f"{parameter_breakdown(config)['total']:,} parameters" in generated["grid/nvium-d128-l24.yaml"]


def test_the_papers_1_5b_run():
    nvium, dense = load_config(CONFIGS / "nvium-1.5b.yaml"), load_config(CONFIGS / "dense-1.5b.yaml")
    assert (nvium.model.num_heads, nvium.model.head_dim, nvium.model.ffn_hidden_size) == (12, 128, 4096)
    assert nvium.training.lr == 2e-4 and nvium.training.lr_schedule == "wsd"
    c = nvium.training.beta_controller
    assert c.enabled and (c.k_up, c.k_down, c.max_step, c.beta_max) == (8.0, 4.0, 100.0, 10.0)
    assert c.baseline_metrics == dense.training.run_dir + "/metrics.jsonl"
    assert dense.model.ffn_hidden_size == 4224 and dense.training.global_batch_size == 512


def test_check_mode_catches_a_hand_edit_and_writing_restores_it(tmp_path, generated, monkeypatch, capsys):
    monkeypatch.setattr(make_configs, "all_files", lambda: generated)  # computed once for the module
    assert make_configs.main(["--output-dir", str(tmp_path)]) == 0
    edited = tmp_path / "tiny.yaml"
    edited.write_text(edited.read_text().replace("train_iters: 300", "train_iters: 301"))
    capsys.readouterr()
    assert make_configs.main(["--check", "--output-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().out.strip() == f"differs from tools/make_configs.py: {edited}"
    assert make_configs.main(["--output-dir", str(tmp_path)]) == 0
    assert edited.read_text() == generated["tiny.yaml"]
    assert make_configs.main(["--check", "--output-dir", str(tmp_path)]) == 0
