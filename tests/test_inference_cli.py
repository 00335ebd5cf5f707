"""The decoding CLIs end to end on a small byte-level export: generate, bench_decode, evaluate."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_inference import make_export, one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="module")
def byte_export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("cli") / "export", vocab_size=256, make_vocab_size_divisible_by=128,
                       seq_length=64)


def test_generate_cli_streams_text_and_stats(byte_export):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), "--model", str(byte_export), "--prompt", "def f(x):",
         "--max-new-tokens", "12", "--show-exits", "--seed", "3"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def f(x):") and result.stdout.count("[") >= 12
    assert "tokens/s" in result.stderr and "mean exit depth" in result.stderr


def test_generate_cli_errors_are_clear(byte_export, capsys):
    import generate

    assert generate.main(["--model", str(byte_export), "--prompt", "x" * 80]) == 2
    assert "longer than the model context" in capsys.readouterr().err
    assert generate.main(["--model", str(byte_export), "--prompt", "hi", "--temperature", "0.5"]) == 2
    assert "mode='full'" in capsys.readouterr().err
    assert generate.main(["--model", str(byte_export / "missing"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert generate.main(["--model", str(byte_export), "ab", "--prompt", "cde", "--max-new-tokens", "5",
                          "--mode", "full", "--top-k", "5"]) == 0
    assert capsys.readouterr().out.count("--- sequence") == 2


def test_bench_decode_json(byte_export, capsys):
    import bench_decode

    dense = make_export(byte_export.parent / "dense", vocab_size=256, make_vocab_size_divisible_by=128, seq_length=64,
                        exits=[])
    assert bench_decode.main(["--model", str(byte_export), "--baseline", str(dense), "--batch-sizes", "1,2",
                              "--new-tokens", "8", "--prompt-tokens", "4", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [b["batch"] for b in result["batches"]] == [1, 2]
    for entry in result["batches"]:
        assert entry["full_tokens_per_s"] > 0 and entry["deferred_tokens_per_s"] > 0
        assert entry["baseline_tokens_per_s"] > 0
        assert entry["efficiency"] == pytest.approx(entry["measured_speedup"] / entry["ideal_speedup"], abs=2e-3)
    assert abs(sum(result["exit_distribution"]) - 1) < 1e-9


def test_evaluate_json(byte_export, tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    import evaluate
    from nvium_dist.inference import NviumGenerator

    prefix = str(tmp_path / "docs_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    docs = [list(b"The quick brown fox jumps over the lazy dog. " * 4), list(b"Lorem ipsum dolor sit amet. " * 6)]
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    assert evaluate.main(["--model", str(byte_export), "--data", prefix, "--seq-length", "32", "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] == (len(docs[0]) + len(docs[1])) // 33
    assert len(result["head_perplexity"]) == 4 and abs(sum(result["exit_usage"]) - 1) < 1e-6
    # the mixture perplexity agrees with mixture_logprobs over the same first window
    stream = docs[0] + docs[1]
    window = torch.tensor(stream[:33])
    log_mix = NviumGenerator.from_pretrained(byte_export).mixture_logprobs(window[:-1])
    assert result["expected_exit_layer"] <= 6
    assert torch.isfinite(log_mix.gather(-1, window[1:, None])).all()
    assert evaluate.main(["--model", str(byte_export), "--data", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
