#!/usr/bin/env python
"""What checkpoints cost: time, the sha256 manifest's share, per-rank memory, and async saves.

    python tools/bench_checkpoint.py --config pretrain/configs/tiny.yaml
    python tools/bench_checkpoint.py --config pretrain/configs/grid/nvium-d768-l24.yaml --set model.seq_length=64
    python tools/bench_checkpoint.py --memory --config pretrain/configs/grid/nvium-d768-l24.yaml \
        --set model.seq_length=64 --set parallel.device=cpu
    python tools/bench_checkpoint.py --async-compare --nproc 4 --config pretrain/configs/grid/nvium-d768-l24.yaml \
        --set model.seq_length=64 --set parallel.device=cpu --set parallel.zero_stage=2

Default (one process): trains `--saves` steps with a checkpoint after each (the trainer's own save path,
timed), then, over `--rounds` interleaved rounds on the newest checkpoint, times reading every file (the
I/O floor), hashing every file (what the manifest adds to a save) and `verify_manifest` (what a resume adds).

--memory (4 processes, torchrun): ZeRO-2 over 4 ranks trains a step and saves; TP=2 x PP=2 resumes from that
checkpoint (a new layout), trains a step and saves; ZeRO-2 resumes from that one and saves. Per rank and
layout: the extra memory a save and a resume allocate (counted, training/checkpoint_memory.py) against the
target 1.25 x the rank's own 12-byte/parameter shard + the largest tensor.

--async-compare (`--nproc` processes): `--saves` synchronous and `--saves` async saves alternating in one
run (nothing in flight when each starts): how long each blocks training, and how long an async one takes
to finish in the background.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nvium_dist.cli import int_at_least

ROOT = Path(__file__).resolve().parents[1]


def read_all(step_dir: Path) -> int:
    total = 0
    for path in sorted(step_dir.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    total += len(chunk)
    return total


def single_process(args) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from nvium_dist.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        overrides = args.set + [f"training.run_dir={tmp}/run", f"training.train_iters={args.saves}",
                                "training.save_interval=1", f"training.keep_checkpoints={args.saves}",
                                f"training.eval_interval={10**9}", "training.eval_iters=1", "training.log_interval=1",
                                "data.allow_default_corpus=true"]  # a benchmark of saves, not of learning
        config = load_config(args.config, overrides)
        from nvium_dist.checkpoint_io import file_record, list_files, verify_manifest
        from nvium_dist.training import checkpoint as ckpt
        from nvium_dist.training.trainer import Trainer

        save_seconds = []
        real_save = ckpt.save_checkpoint

        def timed_save(*a, **k):
            start = time.perf_counter()
            path = real_save(*a, **k)
            save_seconds.append(time.perf_counter() - start)
            return path

        ckpt.save_checkpoint = timed_save
        Trainer(config).train()
        step_dir = ckpt.checkpoint_root(config.training.run_dir) / f"step_{args.saves:08d}"
        files = list_files(step_dir)
        timings = {"read_s": [], "hash_s": [], "verify_s": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            size = read_all(step_dir)
            timings["read_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for name in files:
                file_record(step_dir, name)
            timings["hash_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            verify_manifest(step_dir)
            timings["verify_s"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in timings.items()}
    save = statistics.median(save_seconds)
    return {
        "config": args.config, "overrides": args.set, "checkpoint_files": len(files),
        "checkpoint_bytes": size, "save_s_median": round(save, 4), "save_s_all": [round(s, 4) for s in save_seconds],
        **{k: round(v, 4) for k, v in medians.items()},
        "hash_gb_per_s": round(size / medians["hash_s"] / 1e9, 3),
        "hash_share_of_save": round(medians["hash_s"] / save, 3),
    }


# -- multi-process modes: this script under torchrun, one JSON file per rank ----------------------------------

def torchrun(args, nproc: int, worker: str, overrides: list[str], out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           __file__, "--worker", worker, "--out", str(out), "--config", args.config, "--saves", str(args.saves)]
    for kv in overrides:
        cmd += ["--set", kv]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(nproc)]


def worker(args) -> None:
    """One rank under torchrun: trains with the config, measuring what `--worker` names."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from nvium_dist.config import load_config

    if args.worker == "memory":
        from nvium_dist.training.checkpoint_memory import measured_training

        result = measured_training(args.config, args.set)
    else:
        result = timed_saves(load_config(args.config, args.set))
    Path(f"{args.out}.rank{result['rank']}.json").write_text(json.dumps(result))


def timed_saves(config) -> dict:
    """Every save of the run alternates synchronous / async (the run has training.async_save on, so the
    trainer made a background writer); each starts with nothing in flight."""
    from nvium_dist.training import checkpoint as ckpt
    from nvium_dist.training.trainer import Trainer

    saves = []
    real_save = ckpt.save_checkpoint

    def timed(engine, config, step, state, write_parts, rank, world_size, background=None):
        mode = ("sync", "async")[len(saves) % 2]
        if background is not None:
            background.wait()
        start = time.perf_counter()
        path = real_save(engine, config, step, state, write_parts, rank, world_size,
                         background if mode == "async" else None)
        blocked = time.perf_counter() - start
        if background is not None:
            background.wait()
        saves.append({"mode": mode, "blocked_s": blocked, "total_s": time.perf_counter() - start})
        return path

    sample_check = Trainer._sample_check

    def timed_sample_check(self):  # a forward pass every save makes, async or not (export's self-check)
        start = time.perf_counter()
        result = sample_check(self)
        sample_seconds.append(time.perf_counter() - start)
        return result

    sample_seconds = []
    ckpt.save_checkpoint = timed
    Trainer._sample_check = timed_sample_check
    trainer = Trainer(config)
    trainer.train()
    for save, seconds in zip(saves, sample_seconds):
        save["sample_check_s"] = seconds
    return {"rank": trainer.info.rank, "saves": saves}


def data_overrides(config_path: str, overrides: list[str], directory: Path) -> list[str]:
    """The bundled corpus tokenised once for every launch (with the config's vocabulary)."""
    from nvium_dist.config import load_config
    from nvium_dist.training.trainer import build_default_data

    paths = build_default_data(directory, load_config(config_path, overrides).model.vocab_size,
                               stdout=subprocess.DEVNULL)
    return [f"data.train_data=[{paths['train']}_text_document]", f"data.valid_data=[{paths['valid']}_text_document]",
            f"data.tokenizer_model={paths['tokenizer']}"]


def quiet_run(tmp: Path, args) -> list[str]:
    return args.set + data_overrides(args.config, args.set, tmp / "data") + [
        f"training.run_dir={tmp}/run", f"training.eval_interval={10**9}", "training.eval_iters=1",
        "training.log_interval=1", "training.keep_checkpoints=1", "training.micro_batch_size=1"]


MEMORY_LAUNCHES = (  # (layout, settings, train_iters): each resumes from the one before, in another layout
    ("zero2-dp4", ["parallel.zero_stage=2", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1"], 1),
    ("tp2-pp2", ["parallel.zero_stage=1", "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"], 2),
    ("zero2-dp4", ["parallel.zero_stage=2", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1"], 3),
)


def memory(args) -> dict:
    mib = 2**20
    table: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = quiet_run(Path(tmp), args) + ["training.global_batch_size=4", f"training.save_interval={10**9}"]
        for launch, (layout, settings, steps) in enumerate(MEMORY_LAUNCHES):
            ranks = torchrun(args, 4, "memory", common + settings + [f"training.train_iters={steps}"],
                             Path(tmp) / f"memory{launch}")
            for r in ranks:
                row = table.setdefault(layout, {}).setdefault(r["rank"], {
                    "shard_mib": r["shard"] / mib, "largest_tensor_mib": r["largest_tensor"] / mib,
                    "bound_mib": r["bound"] / mib, "save_mib": 0.0, "resume_mib": 0.0})
                row["save_mib"] = max(row["save_mib"], r["save"] / mib)
                row["resume_mib"] = max(row["resume_mib"], r["resume"] / mib)
    for ranks in table.values():
        for row in ranks.values():
            row["within_target"] = max(row["save_mib"], row["resume_mib"]) <= row["bound_mib"]
            for key in list(row):
                if key.endswith("_mib"):
                    row[key] = round(row[key], 1)
    return {"config": args.config, "overrides": args.set, "per_rank": table,
            "all_within_target": all(row["within_target"] for ranks in table.values() for row in ranks.values())}


def async_compare(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = quiet_run(Path(tmp), args) + [
            f"training.global_batch_size={args.nproc}", f"training.train_iters={2 * args.saves}",
            "training.save_interval=1", "training.async_save=true"]
        ranks = torchrun(args, args.nproc, "timing", settings, Path(tmp) / "timing")
    saves = [max(r["saves"][i]["blocked_s"] for r in ranks) for i in range(len(ranks[0]["saves"]))]
    sync = [s for i, s in enumerate(saves) if i % 2 == 0]
    blocked = [s for i, s in enumerate(saves) if i % 2 == 1]
    finished = [max(r["saves"][i]["total_s"] for r in ranks) for i in range(1, len(saves), 2)]
    sample = [max(r["saves"][i]["sample_check_s"] for r in ranks) for i in range(1, len(saves), 2)]
    return {"config": args.config, "overrides": args.set, "nproc": args.nproc,
            "sync_save_s": [round(s, 3) for s in sync], "async_blocked_s": [round(s, 3) for s in blocked],
            "async_finished_s": [round(s, 3) for s in finished],
            "async_blocked_sample_check_s": [round(s, 3) for s in sample],
            "blocked_share_of_sync": round(statistics.median(blocked) / statistics.median(sync), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "pretrain/configs/tiny.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--saves", type=int_at_least(1), default=3,
                        help="saves timed (--async-compare: of each kind)")
    parser.add_argument("--rounds", type=int_at_least(1), default=3, help="interleaved read/hash/verify rounds")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--memory", action="store_true", help="per-rank extra memory of saves and resumes, 4 processes")
    mode.add_argument("--async-compare", action="store_true", help="blocked time of sync vs async saves")
    parser.add_argument("--nproc", type=int_at_least(1), default=2, help="processes for --async-compare")
    parser.add_argument("--worker", choices=("memory", "timing"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from nvium_dist.config import ConfigError, load_config

    try:
        load_config(args.config, args.set)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.worker:
        worker(args)
        return 0
    result = memory(args) if args.memory else async_compare(args) if args.async_compare else single_process(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
