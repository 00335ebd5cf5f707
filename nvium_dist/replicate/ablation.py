"""The routing-collapse ablations of tools/ablate_routing.py: short CPU trainings of the tiny Quadrivium
(pretrain/configs/tiny.yaml) that each change one thing, evaluated on the whole held-out split, in one table.

Every run is a fixed number of steps (its outcome does not depend on wall time). A run is finished when its
`eval.json` exists; an interrupted run resumes from its checkpoints, so re-running the tool continues.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nvium_dist.replicate.pipeline import REPO, data_prefixes, evaluate_export, export_run, read_metrics, say, \
    train_with_torchrun

PAPER_CONTROLLER = ["training.beta_controller.enabled=true", "training.beta_controller.k_up=8.0",
                    "training.beta_controller.k_down=4.0", "training.beta_controller.max_step=100.0",
                    "training.beta_controller.beta_max=10.0"]


@dataclass(frozen=True)
class Ablation:
    name: str
    change: str  # what differs from the faithful tiny setup, for the table
    sets: tuple[str, ...] = ()
    steps: int = 300
    global_batch: int = 16
    dense: bool = False
    # the dense run this one is compared with (same tokens, same steps); its metrics drive a controller
    dense_ref: str = "dense"
    controller: bool = False

    @property
    def compared_with(self) -> str:
        """The dense run of this run's ratios: its dense_ref, or itself for a dense run."""
        return self.name if self.dense else self.dense_ref

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch * TINY_SEQ_LENGTH


TINY_SEQ_LENGTH = 128
OLD_INIT = ("model.adapter_init_std=0.02", "model.scaled_output_init=true", "model.norm_eps=1e-5")

ABLATIONS = [
    Ablation("dense", "dense twin (plain LLaMA, MLP 432)", dense=True),
    Ablation("faithful", "none: the paper's init, eps, objective (beta 0.15, 5% router warmup)"),
    Ablation("dense_old_init", "dense twin, previous init (out/down 0.02/sqrt(2L), eps 1e-5)", OLD_INIT[1:],
             dense=True),
    Ablation("old_init", "previous init: adapter W1 N(0, 0.02), out/down 0.02/sqrt(2L), eps 1e-5", OLD_INIT,
             dense_ref="dense_old_init"),
    Ablation("beta0", "beta 0 (no depth penalty)", ("training.beta=0.0",)),
    Ablation("warmup30", "router warmup 30% of steps (paper 5%)", ("training.router_warmup_fraction=0.3",)),
    Ablation("controller", "beta controller, the paper's 1.5B gains (k_up 8, k_down 4, max_step 100)",
             controller=True),
    Ablation("aux0.1", "opt-in remedy: + 0.1 x mean per-head CE", ("training.aux_head_loss=0.1",)),
    Ablation("aux0.03", "opt-in remedy: + 0.03 x mean per-head CE", ("training.aux_head_loss=0.03",)),
    Ablation("aux0.1_controller", "remedy 0.1 + beta controller (paper gains)", ("training.aux_head_loss=0.1",),
             controller=True),
    Ablation("dense_b64", "dense twin, 64 sequences per step", dense=True, global_batch=64),
    Ablation("batch64", "64 sequences per step (the paper's d128 batch; grad accumulation 4)", global_batch=64,
             dense_ref="dense_b64"),
    Ablation("dense_x4", "dense twin, 1200 steps", dense=True, steps=1200),
    Ablation("tokens_x4", "4x tokens per parameter (1200 steps)", steps=1200, dense_ref="dense_x4"),
    Ablation("aux0.1_x4", "remedy 0.1, 1200 steps", ("training.aux_head_loss=0.1",), steps=1200,
             dense_ref="dense_x4"),
]
BY_NAME = {a.name: a for a in ABLATIONS}


@dataclass
class AblationRunner:
    work: Path
    output: Path
    nproc: int = 2
    names: list[str] = field(default_factory=lambda: [a.name for a in ABLATIONS])

    def run_dir(self, name: str) -> Path:
        return self.work / name

    def data(self) -> dict:
        """The first dense run builds the bundled corpus, tokenizer and .bin/.idx; every run reads those."""
        return data_prefixes(self.run_dir("dense"))

    def sets(self, ablation: Ablation) -> list[str]:
        run = self.run_dir(ablation.name)
        sets = [f"training.run_dir={run}", f"training.train_iters={ablation.steps}",
                f"training.global_batch_size={ablation.global_batch}", "training.eval_interval=25",
                "training.log_interval=10", f"training.save_interval={min(100, ablation.steps)}",
                "training.keep_checkpoints=1", *ablation.sets]
        if not ablation.dense:  # the faithful base: the paper's objective, whatever tiny.yaml opts into
            sets.insert(0, "training.aux_head_loss=0.0")
        if ablation.name != "dense":
            d = self.data()
            sets += [f"data.train_data=[{d['train']}]", f"data.valid_data=[{d['valid']}]",
                     f"data.tokenizer_model={d['tokenizer']}"]
        if ablation.controller:
            sets += PAPER_CONTROLLER + [
                f"training.beta_controller.baseline_metrics={self.run_dir(ablation.dense_ref) / 'metrics.jsonl'}"]
        return sets

    def run_one(self, ablation: Ablation) -> dict:
        run = self.run_dir(ablation.name)
        result_path = run / "eval.json"
        if result_path.is_file():
            say(f"{ablation.name}: done ({result_path}); skipping")
            return json.loads(result_path.read_text())
        for needed in {"dense", ablation.dense_ref} - {ablation.name}:
            if not (self.run_dir(needed) / "eval.json").is_file():
                self.run_one(BY_NAME[needed])
        say(f"{ablation.name}: {ablation.change}")
        started = time.time()
        config = "tiny-dense.yaml" if ablation.dense else "tiny.yaml"
        train_with_torchrun(config, self.sets(ablation), self.nproc, "cpu", run / "train.log")
        export = run / "export"
        export_run(run, export, run / "export.log")
        result = evaluate_export(export, self.data()["valid"], 100000, "cpu", run / "eval.log")
        result["wall_s_this_invocation"] = round(time.time() - started, 1)
        result_path.write_text(json.dumps(result, indent=1))
        return result

    def run(self) -> int:
        unknown = sorted(set(self.names) - set(BY_NAME))
        if unknown:
            raise SystemExit(f"error: unknown ablation(s) {unknown}; choose from {sorted(BY_NAME)}")
        for name in self.names:
            self.run_one(BY_NAME[name])
        paths = write_ablation_report(self.work, self.output)
        say(f"report: {paths['report']}, {paths['results']}")
        return 0


def summarise(ablation: Ablation, result: dict, dense_result: dict, metrics: tuple[list, list], vocab: int) -> dict:
    heads = result["head_perplexity"]
    dense_ppl = dense_result["mixture_perplexity"]
    _, evals = metrics
    row = {"name": ablation.name, "change": ablation.change, "settings": asdict(ablation), "tokens": ablation.tokens,
           "mixture_perplexity": result["mixture_perplexity"], "dense_reference": ablation.compared_with,
           "dense_perplexity": dense_ppl, "ratio_to_dense": result["mixture_perplexity"] / dense_ppl,
           "head_perplexity": heads, "exit_usage": result["exit_usage"], "exit_layers": result["exit_layers"],
           "expected_exit_layer": result["expected_exit_layer"], "eval_tokens": result["tokens"],
           "dead_heads": [k for k, p in enumerate(heads) if p >= vocab],
           "final_head_vs_dense": heads[-1] / dense_ppl,
           "final_beta": evals[-1].get("beta") if evals else None,
           "eval_curve": [{"step": e["step"], "eval_ppl": e["eval_ppl"],
                           "head_ppl": [math.exp(min(c, 50.0)) for c in e["head_ce"]],
                           "exit_usage": e["exit_usage"], "beta": e.get("beta")} for e in evals]}
    return row


def plot_final_heads(rows: list[dict], path: Path, vocab: int) -> None:
    """The final head's own held-out perplexity (trainer evaluations) over training, one line per N-vium run."""
    from nvium_dist.replicate.report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in rows:
        if r["settings"]["dense"] or not r["eval_curve"]:
            continue
        curve = r["eval_curve"]
        ax.plot([e["step"] for e in curve], [e["head_ppl"][-1] for e in curve], lw=1.8,
                ls="-" if "aux" in r["name"] else "--", label=r["name"])
    ax.axhline(vocab, color="k", lw=1, ls=":", label="vocabulary size (uniform)")
    ax.set(yscale="log", xlabel="step", ylabel="final head perplexity (held-out)",
           title="Final head alone: dies without the per-head term (dashed), lives with it (solid)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt_ppl(x: float) -> str:
    return f"{x:.1f}" if x < 1e4 else f"{x:.1e}"


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}" if x < 100 else _fmt_ppl(x)


def write_ablation_report(work: Path, output: Path) -> dict:
    """results.json (every number) and report.md (one table) from the finished runs under `work`."""
    from nvium_dist.config import load_config

    vocab = load_config(REPO / "pretrain" / "configs" / "tiny.yaml").model.vocab_size
    rows = []
    for ablation in ABLATIONS:
        path = work / ablation.name / "eval.json"
        dense_path = work / ablation.compared_with / "eval.json"
        if not (path.is_file() and dense_path.is_file()):
            continue
        rows.append(summarise(ablation, json.loads(path.read_text()), json.loads(dense_path.read_text()),
                              read_metrics(work / ablation.name / "metrics.jsonl"), vocab))
    output.mkdir(parents=True, exist_ok=True)
    results = {"base_config": "pretrain/configs/tiny.yaml (d128, L6, exits 1/2/4, vocab 2048, context 128, "
                              "lr 3e-3 cosine, 2 processes)",
               "dead_head_rule": f"held-out perplexity >= vocab size ({vocab}), i.e. worse than uniform",
               "command": "python tools/ablate_routing.py", "runs": rows}
    (output / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| run | change from the faithful setup | tokens | mixture ppl | x dense | head ppl (layers "
             "1/2/4/6) | final head x dense | exit usage | E[exit layer] | dead heads |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["settings"]["dense"]:
            lines.append(f"| {r['name']} | {r['change']} | {r['tokens'] / 1e6:.2f}M | {r['mixture_perplexity']:.1f} "
                         f"| 1 | - | - | - | 6 | - |")
            continue
        heads = " / ".join(_fmt_ppl(p) for p in r["head_perplexity"])
        usage = " / ".join(f"{u:.2f}" for u in r["exit_usage"])
        dead = ", ".join(f"layer {r['exit_layers'][k]}" for k in r["dead_heads"]) or "none"
        lines.append(f"| {r['name']} | {r['change']} | {r['tokens'] / 1e6:.2f}M | {r['mixture_perplexity']:.1f} | "
                     f"{r['ratio_to_dense']:.3f} | {heads} | {_fmt_ratio(r['final_head_vs_dense'])} | {usage} | "
                     f"{r['expected_exit_layer']:.2f} | {dead} |")
    report = [
        "# Routing-collapse ablations", "",
        f"Base: {results['base_config']}; every run 16 sequences x 128 tokens per step unless it says otherwise, "
        "the same data, seed and schedule. Held-out numbers are over the whole validation split "
        "(tools/evaluate.py on the export). A head is dead when its held-out perplexity is at least the "
        f"vocabulary size ({vocab}). `x dense`: mixture perplexity over the dense twin trained on the same "
        "tokens. Regenerate with `python tools/ablate_routing.py` (finished runs are skipped); every number is "
        "in `results.json` (with each run's evaluation curve).", "", *lines, ""]
    if rows:
        plot_final_heads(rows, output / "final_head.png", vocab)
        report += ["![final head perplexity over training](final_head.png)", ""]
    (output / "report.md").write_text("\n".join(report))
    return {"results": output / "results.json", "report": output / "report.md"}
