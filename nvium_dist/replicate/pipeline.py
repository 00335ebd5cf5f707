"""The stages of tools/replicate.py: train dense then N-vium, export, evaluate, benchmark, sample, report.

Every stage writes its result under the work directory and is skipped when that result exists, so a
re-run continues where an interrupted one stopped (training resumes from its checkpoints by itself).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from nvium_dist.config import ConfigError, quadrivium_exits

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


# name -> model/training settings. Width/depth/steps are chosen so that "tiny" fits in ~40 min on 2 CPU cores.
SCALES = {
    "micro": dict(layers=4, hidden=64, heads=2, ffn=172, seq_length=64, steps=12, global_batch=8, micro_batch=4,
                  eval_interval=4, eval_iters=2, lr=3e-3, vocab=512, repeats=1, new_tokens=8, passage_tokens=24,
                  eval_windows=16, device="cpu"),
    "tiny": dict(layers=12, hidden=128, heads=4, ffn=344, seq_length=128, steps=400, global_batch=16, micro_batch=8,
                 eval_interval=50, eval_iters=8, lr=3e-3, vocab=2048, repeats=7, new_tokens=64, passage_tokens=120,
                 eval_windows=100000, device="cpu"),
    "small": dict(layers=16, hidden=256, heads=8, ffn=688, seq_length=256, steps=3000, global_batch=32, micro_batch=8,
                  eval_interval=100, eval_iters=16, lr=2e-3, vocab=2048, repeats=7, new_tokens=96, passage_tokens=160,
                  eval_windows=100000, device="cpu"),
    # One H100 in 6 minutes, by estimate (docs/cluster-scale.md): 20 tokens per parameter for the 6.59M-parameter
    # N-vium (1007 steps x 256 x 512 tokens), 12.1 PFLOP for both models, ~2 min at 100 TFLOP/s sustained.
    "gpu": dict(layers=6, hidden=256, heads=4, ffn=688, seq_length=512, steps=1007, global_batch=256, micro_batch=64,
                eval_interval=100, eval_iters=8, lr=1e-3, vocab=2048, repeats=5, new_tokens=128, passage_tokens=200,
                eval_windows=100000, device="cuda"),
}


def say(message: str) -> None:
    print(f"[replicate {time.strftime('%H:%M:%S')}] {message}", flush=True)



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_info(device: str) -> dict:
    info = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["load_average_at_report"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    if not path.is_file():
        return train, evals
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        (evals if "eval_ce" in record else train).append(record)
    return train, evals


def run_logged(cmd: list[str], log: Path, env: dict | None = None, capture: bool = False) -> str:
    """Runs cmd, echoing its output to the console and to `log`; returns stdout when capture (stderr echoed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    say("$ " + " ".join(map(str, cmd)))
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        if capture:
            proc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=out, text=True)
            out.write(proc.stdout)
        else:
            proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                out.write(chunk.decode(errors="replace"))
            proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(str, cmd[:4]))} ... failed with exit code {proc.returncode}; "
                         f"see {log}. Re-run the same command to resume")
    return proc.stdout if capture else ""


def train_with_torchrun(config: str, sets: list[str], nproc: int, device: str, log: Path) -> None:
    """pretrain/pretrain_nvium.py with pretrain/configs/CONFIG and `--set` overrides on `nproc` processes."""
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), str(REPO / "pretrain" / "pretrain_nvium.py"), "--config",
           str(REPO / "pretrain" / "configs" / config)]
    for item in sets:
        cmd += ["--set", item]
    run_logged(cmd, log, env=env)


def data_prefixes(dense_run: Path) -> dict:
    """The .bin/.idx prefixes and tokenizer that the first dense run built (the bundled corpus) and every run reads."""
    from nvium_dist.training.trainer import default_data_paths

    paths = default_data_paths(dense_run / "data")
    return {"train": f"{paths['train']}_text_document", "valid": f"{paths['valid']}_text_document",
            "tokenizer": str(paths["tokenizer"])}


def export_run(run_dir: Path, export_dir: Path, log: Path, redo: bool = False) -> bool:
    """tools/export_checkpoint.py for a finished run unless its export is there (or `redo`); False when skipped."""
    if not redo and (export_dir / "model.safetensors").is_file() and (export_dir / "config.json").is_file():
        return False
    run_logged([sys.executable, str(TOOLS / "export_checkpoint.py"), "--checkpoint", str(run_dir), "--output",
                str(export_dir)], log)
    return True


def evaluate_export(export_dir: Path, data_prefix: str, max_windows: int, device: str, log: Path) -> dict:
    """tools/evaluate.py's JSON for an export over (up to `max_windows` windows of) a dataset."""
    out = run_logged([sys.executable, str(TOOLS / "evaluate.py"), "--model", str(export_dir), "--data", data_prefix,
                      "--max-windows", str(max_windows), "--batch-size", "16", "--device", device], log, capture=True)
    return parse_json_output(out)


def parse_json_output(text: str) -> dict:
    start = text.find("{")
    if start < 0:
        raise SystemExit(f"error: expected JSON output, got: {text[-500:]}")
    return json.loads(text[start:])


class Replication:
    def __init__(self, args):
        self.args = args
        s = dict(SCALES[args.scale])
        for key in ("steps", "layers", "hidden", "heads", "ffn", "seq_length", "global_batch", "micro_batch", "lr",
                    "eval_interval", "repeats", "new_tokens", "eval_windows", "device"):
            value = getattr(args, key, None)
            if value is not None:
                s[key] = value
        try:
            s["exits"] = quadrivium_exits(s["layers"])
        except ConfigError as err:
            raise SystemExit(f"error: --layers: {err}") from None
        s["zero_stage"] = args.zero_stage if args.zero_stage is not None else (1 if s["device"] == "cuda" else 2)
        self.s = s
        self.out = (REPO / args.output_dir) if not Path(args.output_dir).is_absolute() else Path(args.output_dir)
        work = args.work_dir or f"runs/replicate-{args.scale}"
        self.work = (REPO / work) if not Path(work).is_absolute() else Path(work)
        self.dense_run, self.nvium_run = self.work / "dense", self.work / "nvium"
        self.exports = {"dense": self.work / "exports" / "dense", "nvium": self.work / "exports" / "nvium"}
        self.timings_path = self.work / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}

    # -- bookkeeping ------------------------------------------------------------------------------------

    def _timed(self, name: str, fn):
        started = time.time()
        result = fn()
        if result is not False:  # False: skipped, keep the time of the run that did it
            self.timings[name] = round(time.time() - started, 1)
            self.work.mkdir(parents=True, exist_ok=True)
            self.timings_path.write_text(json.dumps(self.timings, indent=1))
        return result

    def model_sets(self, dense: bool) -> list[str]:
        s = self.s
        if dense:
            from nvium_dist.model_info import matched_dense_ffn

            self.dense_ffn = matched_dense_ffn(self.model_config())
        return [f"model.vocab_size={s['vocab']}", f"model.hidden_size={s['hidden']}",
                f"model.num_layers={s['layers']}", f"model.num_heads={s['heads']}",
                f"model.ffn_hidden_size={self.dense_ffn if dense else s['ffn']}",
                f"model.exits={[] if dense else s['exits']}".replace(" ", ""),
                f"model.seq_length={s['seq_length']}"]

    def model_config(self, dense: bool = False):
        from nvium_dist.config import ModelConfig

        s = self.s
        return ModelConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_layers=s["layers"], num_heads=s["heads"],
                           ffn_hidden_size=s["ffn"], exits=[] if dense else list(s["exits"]),
                           seq_length=s["seq_length"])

    def training_sets(self, run_dir: Path) -> list[str]:
        s, a = self.s, self.args
        steps = s["steps"]
        return [f"training.run_dir={run_dir}", f"training.train_iters={steps}", f"training.seed={a.seed}",
                f"training.micro_batch_size={s['micro_batch']}", f"training.global_batch_size={s['global_batch']}",
                f"training.lr={s['lr']}", f"training.eval_interval={s['eval_interval']}",
                f"training.eval_iters={s['eval_iters']}", f"training.log_interval={max(1, min(10, steps // 25))}",
                f"training.save_interval={max(s['eval_interval'], steps // 4)}", "training.keep_checkpoints=2",
                f"training.beta={a.beta}", f"training.router_warmup_fraction={a.router_warmup_fraction}",
                f"parallel.device={s['device']}", f"parallel.zero_stage={s['zero_stage']}", "parallel.tensor_parallel=1"]

    # -- stages -----------------------------------------------------------------------------------------

    def _trained(self, run_dir: Path) -> bool:
        _, evals = read_metrics(run_dir / "metrics.jsonl")
        return (run_dir / "checkpoints" / "latest").exists() and any(e["step"] == self.s["steps"] for e in evals)

    def _torchrun(self, name: str, config: str, sets: list[str]):
        train_with_torchrun(config, sets, self.args.nproc, self.s["device"], self.work / "logs" / f"train_{name}.log")

    def data_prefixes(self) -> dict:
        return data_prefixes(self.dense_run)

    def train_dense(self):
        sets = self.model_sets(dense=True) + self.training_sets(self.dense_run)
        if self._trained(self.dense_run):
            say(f"dense baseline already trained ({self.dense_run}); skipping")
            return False
        say(f"training the dense baseline: L={self.s['layers']} d={self.s['hidden']} MLP {self.dense_ffn} "
            f"(parameter-matched), {self.s['steps']} steps, builds the default corpus on first use")
        self._torchrun("dense", "tiny-dense.yaml", sets)

    def train_nvium(self):
        d = self.data_prefixes()
        a = self.args
        sets = self.model_sets(dense=False) + self.training_sets(self.nvium_run) + [
            f"data.train_data=[{d['train']}]", f"data.valid_data=[{d['valid']}]", f"data.tokenizer_model={d['tokenizer']}",
            "training.beta_controller.enabled=true", f"training.aux_head_loss={a.aux_head_loss}",
            f"training.beta_controller.baseline_metrics={self.dense_run / 'metrics.jsonl'}",
            f"training.beta_controller.k_up={a.k_up}", f"training.beta_controller.k_down={a.k_down}",
            f"training.beta_controller.dead_band={a.dead_band}", f"training.beta_controller.max_step={a.max_step}"]
        if self._trained(self.nvium_run):
            say(f"N-vium already trained ({self.nvium_run}); skipping")
            return False
        say(f"training N-vium (Quadrivium, exits {self.s['exits']} of {self.s['layers']} layers) with the beta "
            f"controller against {self.dense_run / 'metrics.jsonl'}")
        self._torchrun("nvium", "tiny.yaml", sets)

    def export(self, name: str):
        out = self.exports[name]
        run = self.dense_run if name == "dense" else self.nvium_run
        if not export_run(run, out, self.work / "logs" / f"export_{name}.log", redo="export" in self.args.force):
            say(f"export {out} exists; skipping")
            return False

    def evaluate(self, name: str):
        path = self.work / f"eval_{name}.json"
        if path.is_file() and "eval" not in self.args.force:
            say(f"{path} exists; skipping")
            return False
        result = evaluate_export(self.exports[name], self.data_prefixes()["valid"], self.s["eval_windows"],
                                 self.s["device"], self.work / "logs" / f"eval_{name}.log")
        path.write_text(json.dumps(result, indent=1))
        say(f"{name}: held-out perplexity {result['mixture_perplexity']:.3f} over {result['tokens']:,} tokens")

    def bench(self):
        path = self.work / "bench.json"
        if path.is_file() and "bench" not in self.args.force:
            say(f"{path} exists; skipping")
            return False
        from nvium_dist.replicate.bench import bench_decode

        batch_sizes = self.args.batch_sizes
        say(f"decode benchmark: dense vs N-vium full vs N-vium deferred, batch sizes {batch_sizes}, "
            f"{self.s['new_tokens']} new tokens, best of {self.s['repeats']} interleaved repeats, "
            f"{self.args.threads} thread(s)")
        result = bench_decode(str(self.exports["nvium"]), str(self.exports["dense"]), self.data_prefixes()["valid"],
                              batch_sizes, self.s["new_tokens"], prompt_tokens=16, repeats=self.s["repeats"],
                              seed=self.args.seed, threads=self.args.threads, device=self.s["device"], log=say)
        path.write_text(json.dumps(result, indent=1))

    def passage(self):
        path = self.work / "passage.json"
        if path.is_file() and "passage" not in self.args.force:
            say(f"{path} exists; skipping")
            return False
        from nvium_dist.replicate.bench import sample_passage

        result = sample_passage(str(self.exports["nvium"]), self.args.prompt, self.s["passage_tokens"],
                                seed=self.args.seed, device=self.s["device"])
        path.write_text(json.dumps(result, indent=1))
        say(f"passage: {len(result['tokens'])} tokens, exit histogram {result['exit_histogram']}")

    def report(self):
        from nvium_dist.replicate.report import write_report

        dense_train, dense_evals = read_metrics(self.dense_run / "metrics.jsonl")
        nv_train, nv_evals = read_metrics(self.nvium_run / "metrics.jsonl")
        load = lambda name: json.loads((self.work / name).read_text())  # noqa: E731
        cmd = "python tools/replicate.py " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("replicate.py") else ""
        context = {
            "scale": self.args.scale, "settings": self.s, "args": vars(self.args), "command": cmd.strip(),
            "date": self.args.date or datetime.date.today().isoformat(), "machine": machine_info(self.s["device"]),
            "dense_ffn": self.dense_ffn, "work_dir": str(self.work), "timings": self.timings,
            "dense": {"train": dense_train, "evals": dense_evals, "eval": load("eval_dense.json")},
            "nvium": {"train": nv_train, "evals": nv_evals, "eval": load("eval_nvium.json")},
            "bench": load("bench.json"), "passage": load("passage.json"),
            "export_configs": {n: json.loads((p / "config.json").read_text()) for n, p in self.exports.items()},
        }
        import dataclasses

        from nvium_dist.model_info import model_report

        dense_config = dataclasses.replace(self.model_config(dense=True), ffn_hidden_size=self.dense_ffn)
        context["parameters"] = {"nvium": model_report(self.model_config())["total_parameters"],
                                 "dense": model_report(dense_config)["total_parameters"]}
        paths = write_report(self.out, context)
        say(f"report: {paths['report']} ({len(paths['plots'])} plots), {paths['results']}")
        return paths

    def run(self) -> int:
        started = time.time()
        s = self.s
        say(f"scale {self.args.scale}: L={s['layers']} d={s['hidden']} heads={s['heads']} MLP {s['ffn']} exits "
            f"{s['exits']} context {s['seq_length']}, {s['steps']} steps x {s['global_batch']} sequences, "
            f"{self.args.nproc} processes on {s['device']}; work dir {self.work}, report {self.out}")
        self.model_sets(dense=True)  # computes the matched dense width
        self.work.mkdir(parents=True, exist_ok=True)
        self._timed("train_dense", self.train_dense)
        self._timed("train_nvium", self.train_nvium)
        for name in ("dense", "nvium"):
            self._timed(f"export_{name}", lambda: self.export(name))
        for name in ("dense", "nvium"):
            self._timed(f"eval_{name}", lambda: self.evaluate(name))
        self._timed("bench", self.bench)
        self._timed("passage", self.passage)
        self.timings["this_invocation_s"] = round(time.time() - started, 1)
        self._timed("report", self.report)
        say(f"done in {time.time() - started:.0f} s (this invocation)")
        return 0
