"""tools/replicate.py: the Quadrivium exit placement, the report writer on synthetic records (fast), and the
whole command end to end at micro scale (slow: two torchrun trainings, exports, evaluation, benchmark)."""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLOTS = ["loss.png", "exit_usage.png", "beta.png", "decode.png", "passage.png"]
RESULT_KEYS = {"date", "machine", "command", "settings", "parameters", "timings_s", "total_wall_s", "targets",
               "perplexity", "trainer_final_eval", "beta", "decode", "passage", "eval_curves", "train_curves"}


def test_quadrivium_exits_are_one_rule_everywhere():
    """make_configs, replicate and convert_from_hf once gave [1,2,4], [1,3,4] and [2,3,4] at L=6."""
    import yaml

    from nvium_dist.config import ConfigError, quadrivium_exits
    from nvium_dist.hf.from_hf import parse_exits
    from nvium_dist.replicate.pipeline import Replication

    assert [quadrivium_exits(L) for L in (4, 6, 8, 10, 12, 48)] == [
        [1, 2, 3], [1, 2, 4], [2, 4, 6], [2, 5, 7], [3, 6, 9], [12, 24, 36]]
    for layers in range(4, 49):
        assert parse_exits("quadrivium", layers) == quadrivium_exits(layers)
    for path in (REPO / "pretrain" / "configs" / "grid").glob("nvium-*.yaml"):  # tools/make_configs.py's output
        model = yaml.safe_load(path.read_text())["model"]
        assert model["exits"] == quadrivium_exits(model["num_layers"]), path
    args = argparse.Namespace(scale="micro", layers=6, zero_stage=None, output_dir="reports/x", work_dir=None)
    assert Replication(args).s["exits"] == [1, 2, 4]
    with pytest.raises(ConfigError):
        quadrivium_exits(3)
    with pytest.raises(SystemExit):
        Replication(argparse.Namespace(**{**vars(args), "layers": 3}))


def test_help_runs_without_torch_distributed():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "replicate.py"), "--help"], capture_output=True,
                         text=True, check=True)
    assert "--scale" in out.stdout and "--output-dir" in out.stdout and "resume" in out.stdout.lower()


def _synthetic_context():
    steps, layers = 40, 8
    train = lambda offset: [{"step": s, "lm_loss": 6 - s / 20 + offset, "loss": 6 - s / 20, "beta": 0.1 + s / 400,  # noqa: E731
                             "router_warmup": s <= 4} for s in range(2, steps + 1, 2)]
    evals = lambda offset, k: [{"step": s, "eval_ce": 5.5 - s / 40 + offset, "eval_ppl": math.exp(5.5 - s / 40),  # noqa: E731
                                "head_ce": [6, 5.8, 5.6, 5.5][:k], "exit_usage": [0.25] * k if k > 1 else [1.0],
                                "expected_depth": 0.6, "ideal_speedup": 1.6, "beta": 0.1, "eval_tokens": 1000}
                               for s in range(10, steps + 1, 10)]
    bench = {"num_layers": layers, "exit_layers": [2, 4, 6, 8], "threads": 1, "device": "cpu", "new_tokens": 8,
             "prompt_tokens": 16, "repeats": 2, "batches": []}
    for b, sp in ((1, 1.5), (8, 0.9)):
        bench["batches"].append({"batch": b, "tokens_per_s": {"dense": 100.0 * b, "nvium_full": 95.0 * b,
                                                              "nvium_deferred": 100.0 * b * sp},
                                 "speedup_deferred_vs_dense": sp, "speedup_deferred_vs_full": sp * 1.05,
                                 "exit_histogram": [2, 3, 2, 1], "mean_exit_layer": 4.25, "ideal_speedup": 1.88,
                                 "efficiency_vs_ideal": 0.8, "same_tokens_full_deferred": True})
    ev = lambda ppl: {"mixture_perplexity": ppl, "mixture_cross_entropy": math.log(ppl), "tokens": 5000,  # noqa: E731
                      "windows": 40, "head_perplexity": [300, 250, 220, 200], "exit_usage": [0.1, 0.4, 0.2, 0.3],
                      "expected_exit_layer": 4.8, "ideal_deferred_speedup": 1.67}
    passage = {"prompt": "ROMEO:\n", "tokens": [1, 2, 3, 4], "exits": [0, 1, 2, 3],
               "pieces": [" Good", " morrow,\n", "\tmy\x03", " lord" * 30], "exit_layers": [2, 4, 6, 8],
               "exit_histogram": [1, 1, 1, 1], "mean_exit_layer": 5.0, "seed": 0, "text": "..."}
    settings = {"layers": layers, "hidden": 64, "heads": 2, "ffn": 172, "exits": [2, 4, 6], "seq_length": 64,
                "steps": steps, "global_batch": 8, "eval_interval": 10, "lr": 3e-3, "vocab": 512, "zero_stage": 2,
                "device": "cpu"}
    args = {"beta": 0.1, "dead_band": 0.003, "k_up": 8.0, "k_down": 8.0, "max_step": 0.25, "seed": 1,
            "router_warmup_fraction": 0.05, "nproc": 2}
    return {"scale": "micro", "settings": settings, "args": args, "command": "python tools/replicate.py --scale micro",
            "date": "2026-11-28", "machine": {"cpu_cores": 2, "memory_gib": 24.0, "platform": "linux", "torch": "x"},
            "dense_ffn": 200, "work_dir": "/tmp/x", "timings": {"train_dense": 10.0, "train_nvium": 12.0},
            "parameters": {"nvium": 1000, "dense": 1004},
            "dense": {"train": train(0), "evals": evals(0, 1), "eval": ev(200.0)},
            "nvium": {"train": train(0.01), "evals": evals(0.01, 4), "eval": ev(201.0)},
            "bench": bench, "passage": passage, "export_configs": {}}


def test_report_from_synthetic_records(tmp_path):
    from nvium_dist.replicate.report import write_report

    paths = write_report(tmp_path, _synthetic_context())
    results = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["targets"]["perplexity_ratio"]["met"] is True  # 201 / 200 = 1.005
    assert results["targets"]["decode_speedup_batch1_deferred_vs_dense"]["met"] is True
    assert results["targets"]["final_head_perplexity_ratio"] == {"target": "<= 1.5", "measured": 1.0, "met": True}
    report = paths["report"].read_text()
    assert "| held-out perplexity" in report and "**met**" in report and "No dead head: target met" in report
    for name in PLOTS:
        assert (tmp_path / name).stat().st_size > 5000, name


def test_report_names_a_dead_final_head(tmp_path):
    from nvium_dist.replicate.report import write_report

    context = _synthetic_context()
    context["nvium"]["eval"]["head_perplexity"] = [300, 250, 220, 5009.0]
    write_report(tmp_path, context)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["targets"]["final_head_perplexity_ratio"]["met"] is False
    assert "No dead head: target missed" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_replicate_end_to_end_micro(tmp_path):
    """The one command at micro scale: dense then N-vium via torchrun, export, evaluate, bench, passage, report;
    a second invocation skips every finished stage."""
    cmd = [sys.executable, str(REPO / "tools" / "replicate.py"), "--scale", "micro", "--output-dir",
           str(tmp_path / "report"), "--work-dir", str(tmp_path / "work"), "--batch-sizes", "1,2"]
    subprocess.run(cmd, check=True, cwd=REPO, timeout=900)
    report_dir = tmp_path / "report"
    assert "N-vium" in (report_dir / "report.md").read_text()
    results = json.loads((report_dir / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert [b["batch"] for b in results["decode"]["batches"]] == [1, 2]
    assert all(b["same_tokens_full_deferred"] for b in results["decode"]["batches"])
    assert results["settings"]["exits"] == [1, 2, 3]
    for name in PLOTS:
        assert (report_dir / name).stat().st_size > 5000, name
    again = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("skipping") >= 7, again.stdout
