"""The decoding CLIs end to end on a small byte-level export: generate, bench_decode, evaluate."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_inference import make_export, one_thread  # noqa: F401 (autouse fixture)
from trainer_fixtures import corpus  # noqa: F401

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
    assert generate.main(["--model", str(byte_export), "ab", "c", "de", "--max-new-tokens", "4", "--max-batch", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("--- sequence") == 3 and "3 sequence(s) in 2 row(s)" in captured.err
    with pytest.raises(SystemExit):  # argparse's usage error, before the model loads
        generate.main(["--model", str(byte_export), "ab", "--max-new-tokens", "4", "--max-batch", "0"])
    assert "--max-batch: must be >= 1" in capsys.readouterr().err


def test_bench_decode_json(byte_export, capsys):
    import bench_decode

    dense = make_export(byte_export.parent / "dense", vocab_size=256, make_vocab_size_divisible_by=128, seq_length=64,
                        exits=[])
    assert bench_decode.main(["--model", str(byte_export), "--baseline", str(dense), "--batch-sizes", "1,2",
                              "--continuous", "2:3", "--new-tokens", "8", "--prompt-tokens", "4", "--repeats", "1",
                              "--min-tokens", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["clock"] == "cpu"
    assert [(s["rows"], s["prompts"], s["serving"]) for s in result["settings"]] == [(1, 2, False), (2, 2, False),
                                                                                    (2, 3, True)]
    for entry in result["settings"]:
        assert set(entry["tokens_per_s"]) == set(entry["tokens_per_cpu_s"]) == {"dense", "full", "deferred",
                                                                                "deferred_lockstep"}
        assert all(v > 0 for v in entry["tokens_per_s"].values()) and entry["same_tokens"]
        # on CPU the speedups are by this process's CPU time
        assert entry["speedup"] == pytest.approx(
            entry["tokens_per_cpu_s"]["deferred"] / entry["tokens_per_cpu_s"]["full"], abs=2e-3)
        assert entry["efficiency"] == pytest.approx(entry["speedup"] / entry["ideal_speedup"], abs=2e-3)
        assert 1 <= entry["lockstep_ideal"] <= entry["ideal_speedup"] + 1e-6 and entry["work_model"] >= 1
        # a real bound: the profiled runs' speedup never exceeds it, whatever the machine's load
        assert 0 < entry["profiled_speedup"] <= entry["upper_segments_free_bound"]
        assert len(entry["load_average"]["before"]) == 3
    assert result["settings"][0]["lockstep_ideal"] == result["settings"][0]["ideal_speedup"]  # one row: no lockstep
    assert result["settings"][2]["generated_tokens"] > 3 * 8 // 2


def test_bench_decode_synthetic_profile(capsys):
    import bench_decode

    tiny = ["--set", "hidden_size=64", "--set", "vocab_size=300", "--set", "num_layers=4", "--set", "exits=[1,2]",
            "--set", "ffn_hidden_size=96"]
    assert bench_decode.main(["--synthetic", *tiny, "--batch-sizes", "1", "--continuous", "", "--new-tokens", "6",
                              "--min-tokens", "6", "--prompt-tokens", "3", "--repeats", "1", "--profile",
                              "--clock", "wall"]) == 0
    captured = capsys.readouterr()
    assert "the routers send" not in captured.err  # 70% at the first exit: no collapse warning
    result = json.loads(captured.out)
    assert result["exit_layers"] == [1, 2, 4] and result["vocab_size"] == 300 and result["clock"] == "wall"
    entry = result["settings"][0]
    tps = entry["tokens_per_s"]
    assert entry["speedup"] == pytest.approx(tps["deferred"] / tps["full"], abs=2e-3)
    profile = result["profile_batch1"]
    for mode in ("full", "deferred"):
        assert {"segment 0", "router", "adapter", "output", "sampling", "bookkeeping", "driver and other"} \
            <= set(profile[mode])
        parts = sum(v for k, v in profile[mode].items() if k != "total")
        assert parts == pytest.approx(profile[mode]["total"], rel=1e-3)
    assert "segment 2" in profile["full"] and profile["heads_model"] > 1
    assert bench_decode.main(["--synthetic", *tiny, "--first-exit-rate", "0.999", "--batch-sizes", "1", "--continuous",
                              "", "--new-tokens", "6", "--min-tokens", "6", "--prompt-tokens", "3", "--repeats", "1"]) == 0
    assert "the routers send 100.0% of tokens to the exit after layer 1 (exit histogram [6, 0, 0]" \
        in capsys.readouterr().err
    assert bench_decode.main(["--synthetic", "--set", "colour=blue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert bench_decode.main(["--synthetic", "--continuous", "4:2"]) == 2
    assert "PROMPTS >= ROWS" in capsys.readouterr().err


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
    # the random export's peaked logits are worse than uniform on text: every head counts as dead
    assert result["dead_heads"] == [layer for layer, p in zip([1, 2, 4, 6], result["head_perplexity"]) if p >= 256]
    assert result["dead_heads"]
    args = ["--model", str(byte_export), "--data", prefix, "--seq-length", "32", "--require-live-heads"]
    assert evaluate.main(args) == 3
    assert f"dead head(s) after layer(s) {result['dead_heads']}" in capsys.readouterr().err


def _byte_dataset(prefix: Path, docs: list[list[int]], summary_tokenizer: dict | None = None) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    if summary_tokenizer is not None:
        (prefix.parent / (prefix.name + ".summary.json")).write_text(json.dumps({"tokenizer": summary_tokenizer}))
    return str(prefix)


def test_evaluate_refuses_bad_arguments_and_data(byte_export, tmp_path, capsys):
    import evaluate

    good = _byte_dataset(tmp_path / "good", [list(b"some text to evaluate on. " * 8)])
    for bad in (["--batch-size", "0"], ["--seq-length", "-5"], ["--max-windows", "0"]):
        with pytest.raises(SystemExit) as exited:
            evaluate.main(["--model", str(byte_export), "--data", good, *bad])
        assert exited.value.code == 2 and "must be >=" in capsys.readouterr().err
    out_of_range = _byte_dataset(tmp_path / "ids", [list(b"fine text ") + [300, 7]])
    assert evaluate.main(["--model", str(byte_export), "--data", out_of_range]) == 2
    err = capsys.readouterr().err
    assert f"{out_of_range}.bin: token id 300" in err and "outside the vocabulary of 256" in err
    empty = _byte_dataset(tmp_path / "empty", [])
    assert evaluate.main(["--model", str(byte_export), "--data", empty]) == 2
    assert "the dataset is empty" in capsys.readouterr().err


def test_evaluate_refuses_data_made_with_another_tokenizer(tmp_path, capsys, corpus):  # noqa: F811
    """An export with a SentencePiece tokenizer and data whose .summary.json records a different one."""
    import evaluate

    export = make_export(tmp_path / "export", vocab_size=512, make_vocab_size_divisible_by=128, seq_length=64)
    config = json.loads((export / "config.json").read_text())
    config["tokenizer"] = {"type": "sentencepiece", "file": "tokenizer.model"}
    (export / "config.json").write_text(json.dumps(config))
    (export / "tokenizer.model").write_bytes(Path(corpus["tokenizer"]).read_bytes())
    data = _byte_dataset(tmp_path / "other", [list(range(2, 200)) * 3],
                         {"model": "/elsewhere/other.model", "sha256": "0" * 64, "vocab_size": 512})
    assert evaluate.main(["--model", str(export), "--data", data]) == 2
    err = capsys.readouterr().err
    assert "was tokenised with /elsewhere/other.model" in err and "not with the export's" in err


def test_generate_refuses_undecodable_prompts(byte_export, tmp_path):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    for args in (["--prompt-file", str(binary)], [b"ab\xffcd"], ["--prompt", "x", "--max-new-tokens", "-1"]):
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--model", str(byte_export), *args],
                              capture_output=True, timeout=120)
        err = done.stderr.decode()
        assert done.returncode == 2 and "Traceback" not in err, err
        assert ("not UTF-8 text" in err or "is not valid UTF-8" in err or "must be >= 0" in err), err


def test_generate_keeps_the_spaces_sentencepiece_pieces_carry(tmp_path, corpus, capsys):  # noqa: F811
    """Streamed, with --show-exits, and batched: the text is the decoded whole ("ROMEO: we", not "ROMEO:we")."""
    import re

    import generate
    from nvium_dist.inference import NviumGenerator

    export = make_export(tmp_path / "spm", tokenizer=corpus["tokenizer"], vocab_size=512,
                         make_vocab_size_divisible_by=128, seq_length=64)
    generator = NviumGenerator.from_pretrained(str(export))
    tok = generator.tokenizer
    prompts = [tok.encode("ROMEO:"), tok.encode("Enter KING")]
    expected = []
    for prompt in prompts:
        out = generator.generate([prompt], 30, seed=0)
        expected.append(tok.decode(prompt + out.tokens[0]))
    assert all(text.count(" ") >= 5 for text in expected), expected  # the samples are words (the test's premise)

    def without_exits(text):
        return re.sub(r"\[\d\]", "", text)

    for flags in ([], ["--show-exits"]):
        assert generate.main(["--model", str(export), "--prompt", "ROMEO:", "--max-new-tokens", "30", *flags]) == 0
        assert without_exits(capsys.readouterr().out).rstrip("\n") == expected[0]
    batch = generator.generate(prompts, 30, seed=0)
    assert generate.main(["--model", str(export), "ROMEO:", "Enter KING", "--max-new-tokens", "30",
                          "--show-exits"]) == 0
    rows = re.split(r"--- sequence \d\n", capsys.readouterr().out)[1:]
    assert [without_exits(row).rstrip("\n") for row in rows] == [
        tok.decode(prompt + tokens) for prompt, tokens in zip(batch.prompts, batch.tokens)]
