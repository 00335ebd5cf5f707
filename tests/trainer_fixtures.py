"""A small tokenised corpus built once per session with the real tools, and trainer launch helpers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build_small_corpus(directory: Path) -> dict:
    """Default corpus -> 512-piece SentencePiece model -> train/valid .bin/.idx, through the CLIs."""
    def tool(name, *args):
        subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], check=True,
                       capture_output=True)

    tool("build_default_corpus.py", "--output-dir", directory / "corpus")
    tool("train_tokenizer.py", "--input", directory / "corpus" / "train.jsonl", "--vocab-size", 512,
         "--output-prefix", directory / "tok")
    prefixes = {}
    for split in ("train", "valid"):
        tool("preprocess_data.py", "--input", directory / "corpus" / f"{split}.jsonl", "--json-keys", "text",
             "--tokenizer-model", directory / "tok.model", "--output-prefix", directory / split, "--append-eod")
        prefixes[split] = str(directory / f"{split}_text_document")
    return {"train": prefixes["train"], "valid": prefixes["valid"], "tokenizer": str(directory / "tok.model")}


_CORPUS: dict = {}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Built once per session, however many test modules import this fixture."""
    if not _CORPUS:
        _CORPUS.update(build_small_corpus(tmp_path_factory.mktemp("corpus")))
    return _CORPUS


def small_overrides(data: dict, run_dir: Path, **extra) -> list[str]:
    settings = {
        "model.vocab_size": 512, "model.hidden_size": 64, "model.num_layers": 4, "model.num_heads": 4,
        "model.ffn_hidden_size": 128, "model.exits": "[1,2,3]", "model.seq_length": 64,
        "model.make_vocab_size_divisible_by": 64,
        "data.train_data": f"[{data['train']}]", "data.valid_data": f"[{data['valid']}]",
        "data.tokenizer_model": data["tokenizer"],
        "training.run_dir": str(run_dir), "training.micro_batch_size": 4, "training.global_batch_size": 8,
        "training.train_iters": 5, "training.eval_interval": 5, "training.eval_iters": 2,
        "training.log_interval": 1, "training.save_interval": 100, "training.lr": 2e-3,
        "training.router_warmup_steps": 2, "parallel.zero_stage": 0,
        "training.aux_head_loss": 0.0,  # the paper's objective, also where tiny.yaml (the CLI's base) opts in
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


def read_metrics(run_dir: Path) -> tuple[dict[int, dict], list[dict]]:
    """(train records by step, eval records) from RUN_DIR/metrics.jsonl."""
    train, evals = {}, []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        (evals.append(record) if "eval_ce" in record else train.__setitem__(record["step"], record))
    return train, evals


def train_in_process(rank, world_size, overrides):
    """run_distributed target: the real Trainer in forkserver processes."""
    from nvium_dist.config import load_config
    from nvium_dist.training.trainer import Trainer

    config = load_config(None, overrides)
    trainer = Trainer(config)
    code = trainer.train()
    return code if rank else (code, read_metrics(config.training.run_dir), trainer.resumed_step)


def train(world_size, corpus, run_dir, **extra):
    """The trainer in `world_size` forkserver processes -> (train records by step, eval records, the step the
    run resumed from or None)."""
    from distributed_runner import run_distributed

    results = run_distributed(train_in_process, world_size, small_overrides(corpus, run_dir, **extra), timeout=600)
    code, (records, evals), resumed_step = results[0]
    assert code == 0
    return records, evals, resumed_step
