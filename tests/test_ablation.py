"""tools/ablate_routing.py: the run list, the override sets, and the table written from finished runs."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _finished(work: Path, name: str, head_ppl: list[float], usage: list[float], step: int = 300):
    run = work / name
    run.mkdir(parents=True)
    ce = sum(u * p for u, p in zip(usage, head_ppl)) if len(head_ppl) > 1 else head_ppl[0]
    (run / "eval.json").write_text(json.dumps({
        "mixture_perplexity": ce, "head_perplexity": head_ppl, "exit_usage": usage, "tokens": 81152,
        "exit_layers": [1, 2, 4, 6][-len(head_ppl):], "expected_exit_layer": 2.0}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": step, "eval_ce": 4.0, "eval_ppl": 54.6, "beta": 0.15,
                                                   "head_ce": [4.0] * len(head_ppl), "exit_usage": usage}) + "\n")


def test_report_table_flags_dead_and_starved_heads(tmp_path):
    from nvium_dist.replicate.ablation import write_ablation_report

    _finished(tmp_path, "dense", [100.0], [1.0])
    _finished(tmp_path, "faithful", [90.0, 3000.0, 1e9, 400.0], [0.9, 0.1, 0.0, 0.0])
    _finished(tmp_path, "aux0.1", [110.0, 105.0, 102.0, 101.0], [0.5, 0.3, 0.1, 0.1])
    _finished(tmp_path, "dense_x4", [40.0], [1.0], step=1200)
    paths = write_ablation_report(tmp_path, tmp_path / "out")
    results = json.loads(paths["results"].read_text())
    rows = {r["name"]: r for r in results["runs"]}
    assert sorted(rows) == ["aux0.1", "dense", "dense_x4", "faithful"]  # unfinished runs are left out
    assert rows["dense_x4"]["dense_reference"] == "dense_x4" and rows["dense_x4"]["ratio_to_dense"] == 1.0
    assert rows["faithful"]["dead_heads"] == [1, 2] and rows["aux0.1"]["dead_heads"] == []
    assert rows["faithful"]["final_head_vs_dense"] == 4.0
    assert abs(rows["aux0.1"]["ratio_to_dense"] - rows["aux0.1"]["mixture_perplexity"] / 100.0) < 1e-12
    table = paths["report"].read_text()
    assert "| faithful |" in table and "layer 2, layer 4" in table and "| aux0.1 |" in table
    assert (tmp_path / "out" / "final_head.png").stat().st_size > 5000


def test_runs_pin_the_papers_objective_unless_they_change_it(tmp_path):
    from nvium_dist.replicate.ablation import BY_NAME, AblationRunner

    runner = AblationRunner(tmp_path, tmp_path / "out")
    faithful, remedy = runner.sets(BY_NAME["faithful"]), runner.sets(BY_NAME["aux0.1"])
    assert "training.aux_head_loss=0.0" in faithful and "training.train_iters=300" in faithful
    # later --set assignments win: the remedy's weight comes after the pinned 0
    assert remedy.index("training.aux_head_loss=0.1") > remedy.index("training.aux_head_loss=0.0")
    controller = runner.sets(BY_NAME["controller"])
    assert f"training.beta_controller.baseline_metrics={tmp_path / 'dense' / 'metrics.jsonl'}" in controller
    assert "training.global_batch_size=64" in runner.sets(BY_NAME["batch64"])
    assert not any(s.startswith("data.") for s in runner.sets(BY_NAME["dense"]))  # it builds the data


def test_cli_lists_runs_without_torch_distributed():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "ablate_routing.py"), "--list"], capture_output=True,
                         text=True, check=True)
    assert "faithful" in out.stdout and "aux0.1" in out.stdout
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "ablate_routing.py"), "--only", "nope",
                          "--work-dir", "/tmp/nvium-ablate-unused"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown ablation(s) ['nope']" in bad.stderr
