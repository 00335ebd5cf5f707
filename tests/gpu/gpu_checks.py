#!/usr/bin/env python
"""The prepared GPU checks (run by tests/gpu/run_gpu_checks.sh): one CUDA GPU, at most 8 minutes, one JSON
summary at the end. `--cpu-smoke` runs every check on CPU at toy sizes, to catch Python errors without a GPU.

  train       world-1 NCCL, bf16, ZeRO-2, activation checkpointing + chunked loss, 30 steps; the loss falls
  resume      the step-15 checkpoint copied to a fresh run dir resumes at 15 and repeats steps 16-30
  export      tools/export_checkpoint.py; its self-check (in bf16) passes
  decode      deferred vs full decoding of the export on CUDA, fp32 (same tokens) and bf16 (reported)
  chi_square  20,000 next-token draws on CUDA against p_mix (scipy's chi-square, p > 1e-3)
  decode_speed  batch-1 tokens/s at d1536 x L48, random weights, router 1 biased to ~70% exits: deferred
              vs full vs the dense twin (the paper's 1.58x setting)
  memory      nvium-1.5b training-step activation peak per micro-batch size, checkpointing + chunked loss,
              measured next to tools/model_info's estimate
  budget      a 1.5B-shaped slice (d1536, 4 layers, 1024 tokens) trained 3 steps: the allocator's peak
              (torch.cuda.max_memory_allocated) next to model_info's gpu_memory_budget, and one save timed
  bench_decode  tools/bench_decode.py --device cuda at batch 1, with and without --cuda-graphs (host waits per
              token counted), and tests/test_inference_graphs.py (captured graphs = eager calls)
With >= 2 GPUs (in --cpu-smoke: 2 CPU processes) also:
  zero2       world 2, ZeRO-2 bf16: trains, and the engine reduces gradients in fp32 (its setup line)
  tp2         world 2, TP=2 ZeRO-1 trains
  pp2_resume  world 2, PP=2 saves per stage; resumed into DP=2 ZeRO-2 (another layout) with torch's fused AdamW
  pipeline_decode  tools/generate.py --pipeline-stages 2 on the export (NCCL between stage processes)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for runs, logs and summary.json")
    p.add_argument("--cpu-smoke", action="store_true", help="every check on CPU at toy sizes (no GPU needed)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds; checks that would start later are skipped")
    return p.parse_args(argv)


class Checks:
    def __init__(self, out: Path, smoke: bool):
        self.out, self.smoke = out, smoke
        self.device = "cpu" if smoke else "cuda"
        self.run_dir = out / "run"
        self.export_dir = out / "export"
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", WANDB_MODE="offline")
        if smoke:
            self.env["DS_ACCELERATOR"] = "cpu"

    # -- helpers ---------------------------------------------------------------------------------------

    def train_overrides(self, run_dir: Path, steps: int) -> list[str]:
        sets = {"parallel.device": self.device, "parallel.dtype": "bf16", "parallel.zero_stage": 2,
                "training.activation_checkpointing": "true", "training.loss_chunk_tokens": 256,
                "training.train_iters": steps, "training.save_interval": steps // 2, "training.eval_interval": steps,
                "training.eval_iters": 2, "training.log_interval": 1, "training.run_dir": str(run_dir),
                # the bundled corpus and tokenizer, built once under OUT/data (build_data)
                "data.train_data": f"[{self.out / 'data' / 'shakespeare_train_text_document'}]",
                "data.valid_data": f"[{self.out / 'data' / 'shakespeare_valid_text_document'}]",
                "data.tokenizer_model": str(self.out / "data" / "tokenizer.model")}
        if self.smoke:
            sets.update({"model.num_layers": 4, "model.exits": "[1,2,3]", "model.seq_length": 64,
                         "training.micro_batch_size": 4, "training.global_batch_size": 4})
        return [f"{k}={v}" for k, v in sets.items()]

    def build_data(self) -> None:
        from nvium_dist.training.trainer import build_default_data

        build_default_data(self.out / "data", 2048, workers=4, env=self.env, stdout=subprocess.DEVNULL,
                           tokenizer_args=("--input-sentence-size", 20000 if self.smoke else 200000))

    def torchrun(self, overrides: list[str], log: Path, nproc: int = 1, config: str = "tiny.yaml") -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(ROOT / "pretrain" / "pretrain_nvium.py"), "--config", str(ROOT / "pretrain/configs" / config)]
        cmd += [a for o in overrides for a in ("--set", o)]
        done = subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        log.write_text(done.stdout + done.stderr)
        if done.returncode:
            raise RuntimeError(f"trainer exited {done.returncode}; tail of {log}:\n" + (done.stdout + done.stderr)[-3000:])
        return done.stdout + done.stderr

    @staticmethod
    def losses(run_dir: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r and "eval_ce" not in r}

    def model(self, config, dtype):
        """A randomly initialised model on the check's device, built without the slow per-parameter init."""
        import torch

        from nvium_dist.model import NviumModel

        model = NviumModel(config, initialise=False).to(self.device, dtype)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, 0.02 if "router.logits" not in name else 0.4 / math.sqrt(config.hidden_size))
        return model.eval()

    # -- the checks ------------------------------------------------------------------------------------

    def train(self) -> dict:
        self.build_data()
        steps = 10 if self.smoke else 30
        output = self.torchrun(self.train_overrides(self.run_dir, steps), self.out / "train.log")
        losses = self.losses(self.run_dir)
        values = [losses[s] for s in sorted(losses)]
        head, tail = sum(values[:5]) / 5, sum(values[-5:]) / 5
        setup = re.search(r"optimizer (\w+)", output)
        memory = re.search(r"memory estimate per GPU: (.*)", output)
        return {"ok": len(values) == steps and all(map(math.isfinite, values)) and tail < head,
                "first_losses": values[:3], "last_losses": values[-3:], "mean_first5": head, "mean_last5": tail,
                "optimizer": setup.group(1) if setup else None, "memory_line": memory.group(1) if memory else None,
                "save_seconds": self.save_seconds(output)}

    @staticmethod
    def save_seconds(output: str) -> list[float]:
        """Seconds of each save, from the trainer's "[checkpoint] step N -> PATH (S s)" lines."""
        return [float(x) for x in re.findall(r"^\[checkpoint\] step \d+ -> .* \(([\d.]+) s\)$", output, re.M)]

    def resume(self) -> dict:
        steps = 10 if self.smoke else 30
        middle = f"step_{steps // 2:08d}"
        resumed = self.out / "resumed"
        shutil.rmtree(resumed, ignore_errors=True)
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copytree(self.run_dir / "checkpoints" / middle, resumed / "checkpoints" / middle)
        (resumed / "checkpoints" / "latest").write_text(middle + "\n")
        output = self.torchrun(self.train_overrides(resumed, steps), self.out / "resume.log")
        straight, again = self.losses(self.run_dir), self.losses(resumed)
        diffs = [abs(again[s] - straight[s]) for s in sorted(again)]
        return {"ok": f"at step {steps // 2}" in output and sorted(again) == list(range(steps // 2 + 1, steps + 1))
                and max(diffs) < 1e-2, "resumed_steps": [min(again), max(again)],
                "max_loss_diff": max(diffs), "bitwise_equal": max(diffs) == 0.0}

    def export(self) -> dict:
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "export_checkpoint.py"), "--checkpoint",
                               str(self.run_dir), "--output", str(self.export_dir)], env=self.env,
                              capture_output=True, text=True, timeout=180)
        (self.out / "export.log").write_text(done.stdout + done.stderr)
        line = next((l for l in done.stdout.splitlines() if l.startswith("self-check")), "")
        return {"ok": done.returncode == 0 and bool(line), "self_check": line,
                "error": None if done.returncode == 0 else (done.stdout + done.stderr)[-1500:]}

    def decode(self) -> dict:
        import torch

        from nvium_dist.inference import NviumGenerator

        result = {}
        prompts = [[1, 5, 9, 14], [3, 4], [7, 100, 200, 33, 21, 8]]
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            generator = NviumGenerator.from_pretrained(self.export_dir, device=self.device, dtype=dtype)
            deferred = generator.generate(prompts, 48, seed=7, mode="deferred")
            full = generator.generate(prompts, 48, seed=7, mode="full")
            mismatched = sum(a != b for x, y in zip(deferred.tokens, full.tokens) for a, b in zip(x, y))
            result[name] = {"same_tokens": deferred.tokens == full.tokens, "mismatched_tokens": mismatched,
                            "exit_histogram": deferred.exit_histogram()}
        result["ok"] = result["fp32"]["same_tokens"]
        return result

    def chi_square(self) -> dict:
        import torch
        from scipy.stats import chisquare

        from nvium_dist.inference import NviumGenerator

        generator = NviumGenerator.from_pretrained(self.export_dir, device=self.device, dtype=torch.float32)
        prefix, draws = [1, 40, 7, 300, 12], 20_000
        out = generator.generate([prefix] * draws, 1, seed=2024, mode="deferred")
        counts = torch.bincount(torch.tensor([t[0] for t in out.tokens]), minlength=generator.config.vocab_size)
        expected = generator.mixture_logprobs(prefix)[-1].exp().double().cpu() * draws
        big = expected >= 5  # pool the rare tokens into one cell
        observed = torch.cat([counts[big], counts[~big].sum().view(1)]).double()
        expected = torch.cat([expected[big], expected[~big].sum().view(1)])
        p = float(chisquare(observed.numpy(), (expected * observed.sum() / expected.sum()).numpy()).pvalue)
        return {"ok": p > 1e-3, "p_value": p, "draws": draws, "exit_histogram": out.exit_histogram()}

    def decode_speed(self) -> dict:
        import dataclasses

        import torch

        from nvium_dist.config import load_config
        from nvium_dist.inference import NviumGenerator
        from nvium_dist.inference.generator import Tokenizer
        from nvium_dist.model_info import dense_twin, matched_dense_ffn

        config = load_config(ROOT / "pretrain/configs/nvium-1.5b.yaml").model
        if self.smoke:
            config = dataclasses.replace(config, hidden_size=128, num_heads=4, num_layers=8, exits=[2, 4, 6],
                                         ffn_hidden_size=256, vocab_size=2048)
        dense = dense_twin(config, matched_dense_ffn(config))
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        prompts, new_tokens = [[11, 12, 13, 14, 15, 16, 17, 18]], 16 if self.smoke else 128
        tokens_per_s, exits = {}, None
        for name, model_config in (("nvium", config), ("dense", dense)):
            model = self.model(model_config, torch.bfloat16 if self.device == "cuda" else torch.float32)
            if model_config.exits:  # router 1: P(exit) ~ 0.7 (logit gap log(0.7/0.3)); later routers ~ 50/50
                with torch.no_grad():
                    model.heads[0].router.logits.bias.copy_(torch.tensor([0.0, math.log(0.7 / 0.3)]))
            generator = NviumGenerator(model, Tokenizer("none", None), None, self.device)
            modes = ("deferred", "full") if model_config.exits else ("full",)
            best = {}
            for repeat in range(3):
                for mode in modes:
                    sync()
                    out = generator.generate(prompts, new_tokens, seed=repeat, mode=mode)
                    sync()
                    rate = out.num_tokens / out.seconds
                    best[mode] = max(best.get(mode, 0.0), rate)
                    if mode == "deferred":
                        exits = out.exit_histogram()
            for mode, rate in best.items():
                tokens_per_s[f"{name}_{mode}"] = rate
            del model, generator
            if self.device == "cuda":
                torch.cuda.empty_cache()
        total = sum(exits)
        mean_layer = sum(c * layer for c, layer in zip(exits, config.exit_layers)) / total
        return {"ok": tokens_per_s["nvium_deferred"] > tokens_per_s["nvium_full"], "tokens_per_s": tokens_per_s,
                "deferred_vs_dense": tokens_per_s["nvium_deferred"] / tokens_per_s["dense_full"],
                "deferred_vs_full": tokens_per_s["nvium_deferred"] / tokens_per_s["nvium_full"],
                "exit_fractions": [c / total for c in exits], "ideal_speedup": config.num_layers / mean_layer,
                "model": f"d{config.hidden_size} L{config.num_layers} exits {config.exits}"}

    def memory(self) -> dict:
        cmd = [sys.executable, str(ROOT / "tools" / "bench_memory.py"), "--config",
               str(ROOT / "pretrain/configs/nvium-1.5b.yaml"), "--device", self.device,
               "--variants", "checkpointed+chunked", "--rounds", "1"]
        if self.smoke:
            cmd += ["--set", "model.hidden_size=128", "--set", "model.num_heads=4", "--set", "model.num_layers=4",
                    "--set", "model.exits=[1,2,3]", "--set", "model.ffn_hidden_size=256", "--set",
                    "model.vocab_size=2048", "--micro-batches", "1,2", "--seq-length", "128", "--set",
                    "parallel.device=cpu"]
        else:
            cmd += ["--micro-batches", "1,2,4,8,16"]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=ROOT, timeout=240)
        (self.out / "memory.log").write_text(done.stderr)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        runs = json.loads(done.stdout)["runs"]
        return {"ok": all(0.5 < r["estimate_over_measured"] < 1.5 for r in runs),
                "per_micro_batch": {r["micro_batch"]: {k: r[k] for k in ("measured_peak_mib", "allocator_peak_mib",
                                                                          "estimated_peak_mib", "seconds")}
                                    for r in runs}}

    def budget(self) -> dict:
        """The allocator's real peak over 3 training steps of a 1.5B-shaped slice vs gpu_memory_budget's tensors."""
        from nvium_dist.config import load_config
        from nvium_dist.model_info import gpu_memory_budget

        self.build_data()
        run_dir = self.out / "budget"
        shutil.rmtree(run_dir, ignore_errors=True)
        sets = self.train_overrides(run_dir, 2) + [
            "model.num_layers=4", "model.exits=[1,2,3]", "training.activation_checkpointing=false",
            "training.loss_chunk_tokens=0", "training.micro_batch_size=2", "training.global_batch_size=2",
            "training.eval_iters=1", "data.allow_default_corpus=true"]
        if self.smoke:
            sets += ["model.hidden_size=128", "model.num_heads=4", "model.ffn_hidden_size=256", "model.seq_length=64",
                     "model.router_hidden_width=88"]
        output = self.torchrun(sets, self.out / "budget.log", config="nvium-1.5b.yaml")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        peak_mib = max(r["peak_memory_mb"] for r in records if "peak_memory_mb" in r)
        config = load_config(ROOT / "pretrain/configs/nvium-1.5b.yaml", sets)
        estimate = gpu_memory_budget(config, world_size=1)
        parts = estimate["parts_gib"]
        tensors_mib = 1024 * (parts["model_states"] + parts["activations"] + parts["deepspeed_buckets"]
                              + parts["save_transient"])
        ratio = peak_mib / tensors_mib
        return {"ok": self.smoke or 0.5 < ratio < 1.2, "allocator_peak_mib": round(peak_mib, 1),
                "estimated_tensors_mib": round(tensors_mib, 1), "measured_over_estimate": round(ratio, 3),
                "estimate_parts_gib": parts, "save_seconds": self.save_seconds(output),
                "note": "CPU smoke: peak is the process RSS, not comparable" if self.smoke else None}

    def bench_decode(self) -> dict:
        base = [sys.executable, str(ROOT / "tools" / "bench_decode.py"), "--synthetic", "--device", self.device,
                "--batch-sizes", "1", "--continuous", "", "--repeats", "2", "--min-tokens", "64" if self.smoke else "256"]
        helped = subprocess.run(base[:3] + ["--help"], env=self.env, capture_output=True, text=True, cwd=ROOT)
        variants = {"eager": []}
        if "--cuda-graphs" in helped.stdout and not self.smoke:
            variants["cuda_graphs"] = ["--cuda-graphs"]
        result = {}
        for name, extra in variants.items():
            done = subprocess.run(base + extra, env=self.env, capture_output=True, text=True, cwd=ROOT, timeout=200)
            (self.out / f"bench_decode_{name}.log").write_text(done.stderr)
            if done.returncode:
                raise RuntimeError(f"bench_decode {name}: " + done.stderr[-2000:])
            report = json.loads(done.stdout)
            result[name] = report.get("settings", report)
        result["cuda_graphs_offered"] = "cuda_graphs" in variants
        result["ok"] = all(setting.get("same_tokens", True) for name in variants for setting in result[name])
        if "cuda_graphs" in variants:  # captured graphs against the eager calls: tokens, exits, KV caches
            graphs_test = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_inference_graphs.py"],
                                         env=self.env, capture_output=True, text=True, cwd=ROOT, timeout=120)
            (self.out / "cuda_graphs_test.log").write_text(graphs_test.stdout + graphs_test.stderr)
            result["cuda_graphs_test"] = graphs_test.stdout.strip().splitlines()[-1:]
            result["ok"] = result["ok"] and graphs_test.returncode == 0 and "skipped" not in graphs_test.stdout
        return result

    # -- with two or more GPUs ----------------------------------------------------------------------------

    def two_replicas(self) -> list[str]:
        """A global batch of two micro-batches: one step per replica at DP=2, two accumulated at TP=2 or PP=2."""
        return [f"training.global_batch_size={2 * (4 if self.smoke else 8)}"]

    def zero2(self) -> dict:
        run_dir = self.out / "zero2"
        shutil.rmtree(run_dir, ignore_errors=True)
        output = self.torchrun(self.train_overrides(run_dir, 6) + self.two_replicas(), self.out / "zero2.log", nproc=2)
        reduction = re.search(r"gradient reduction (\w+)", output)
        losses = self.losses(run_dir)
        return {"ok": reduction is not None and reduction.group(1) == "float32" and len(losses) == 6
                and all(map(math.isfinite, losses.values())),
                "gradient_reduction": reduction.group(1) if reduction else None, "losses": losses,
                "save_seconds": self.save_seconds(output)}

    def tp2(self) -> dict:
        run_dir = self.out / "tp2"
        shutil.rmtree(run_dir, ignore_errors=True)
        self.torchrun(self.train_overrides(run_dir, 6) + self.two_replicas() + ["parallel.tensor_parallel=2",
                      "parallel.zero_stage=1"], self.out / "tp2.log", nproc=2)
        losses = self.losses(run_dir)
        return {"ok": len(losses) == 6 and all(map(math.isfinite, losses.values())), "losses": losses}

    def pp2_resume(self) -> dict:
        """PP=2 writes per-stage checkpoints; the step-3 one resumes into DP=2 ZeRO-2 with torch's fused AdamW,
        whose `step` must then live on the GPU."""
        run_dir, resumed = self.out / "pp2", self.out / "pp2-to-dp2"
        for d in (run_dir, resumed):
            shutil.rmtree(d, ignore_errors=True)
        self.torchrun(self.train_overrides(run_dir, 6) + self.two_replicas() + [
            "parallel.pipeline_parallel=2", "parallel.zero_stage=1", "training.save_interval=3"], self.out / "pp2.log",
            nproc=2)
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copytree(run_dir / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
        (resumed / "checkpoints" / "latest").write_text("step_00000003\n")
        output = self.torchrun(self.train_overrides(resumed, 6) + self.two_replicas(), self.out / "pp2-to-dp2.log",
                               nproc=2)
        optimizer = re.search(r"optimizer (\w+)", output)
        straight, again = self.losses(run_dir), self.losses(resumed)
        return {"ok": "at step 3" in output and sorted(again) == [4, 5, 6] and all(map(math.isfinite, again.values())),
                "optimizer": optimizer.group(1) if optimizer else None, "pp2_losses": straight,
                "resumed_losses": again}

    def pipeline_decode(self) -> dict:
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--model", str(self.export_dir),
                               "--prompt-ids", "1,5,9,14", "--max-new-tokens", "16", "--pipeline-stages", "2",
                               "--device", self.device, "--seed", "3"], env=self.env, capture_output=True, text=True,
                              cwd=ROOT, timeout=180)
        (self.out / "pipeline_decode.log").write_text(done.stdout + done.stderr)
        return {"ok": done.returncode == 0, "output": done.stdout[-500:],
                "error": None if done.returncode == 0 else done.stderr[-1500:]}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    checks = Checks(out, args.cpu_smoke)
    import torch

    summary = {"mode": "cpu-smoke" if args.cpu_smoke else "cuda", "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "checks": {}}
    started = time.time()
    needs = {"resume": "train", "export": "train", "decode": "export", "chi_square": "export",
             "pipeline_decode": "export"}
    names = ["train", "resume", "export", "decode", "chi_square", "decode_speed", "memory", "budget", "bench_decode"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    summary["gpus"] = gpus
    multi = ["zero2", "tp2", "pp2_resume", "pipeline_decode"]
    if args.cpu_smoke or gpus >= 2:
        names += multi
    else:
        summary["checks"].update({name: {"ok": True, "skipped": "needs 2 GPUs"} for name in multi})
    for name in names:
        if time.time() - started > args.budget:
            summary["checks"][name] = {"ok": False, "skipped": f"time budget of {args.budget:.0f} s spent"}
            continue
        if name in needs and not summary["checks"][needs[name]]["ok"]:
            summary["checks"][name] = {"ok": False, "skipped": f"{needs[name]} failed"}
            continue
        began = time.time()
        try:
            result = getattr(checks, name)()
        except Exception:  # noqa: BLE001 - one failing check must not hide the others
            result = {"ok": False, "error": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.time() - began, 1)
        summary["checks"][name] = result
        print(f"[gpu-checks] {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)", file=sys.stderr,
              flush=True)
        summary["seconds"] = round(time.time() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # partial, if killed later
    summary["ok"] = all(c["ok"] for c in summary["checks"].values())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
