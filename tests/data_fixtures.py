"""Shared, cached fixtures for the data tests: a small slice of the default corpus, a small
SentencePiece model trained on it, and that slice preprocessed (all real, nothing mocked)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
_CACHE: dict = {}


def run_tool(name, *args, timeout=300):
    """Run tools/<name> in a subprocess; return CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _build(tmp_path_factory):
    if "corpus" in _CACHE:
        return _CACHE["corpus"]
    from nvium_dist.data.default_corpus import iter_documents
    from nvium_dist.data.preprocess import preprocess
    from nvium_dist.data.spm_train import train_sentencepiece

    root = tmp_path_factory.mktemp("data_corpus")
    docs = list(iter_documents("scene"))
    # a/b: two disjoint slices of plays, small enough for fast tests
    a = [d.text for d in docs[:60]]
    b = [d.text for d in docs[400:440]]
    for name, texts in (("a", a), ("b", b)):
        with open(root / f"{name}.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
    tok = train_sentencepiece(iter(a + b), str(root / "tok"), vocab_size=1000, num_threads=1)
    pa = preprocess([str(root / "a.jsonl")], str(root / "a"), tok["model"], append_eod=True, progress=False)
    pb = preprocess([str(root / "b.jsonl")], str(root / "b"), tok["model"], append_eod=True, progress=False)
    info = {"root": root, "model": tok["model"], "texts": {"a": a, "b": b},
            "a": pa["text"]["output_prefix"], "b": pb["text"]["output_prefix"]}
    _CACHE["corpus"] = info
    return info


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return _build(tmp_path_factory)


@pytest.fixture(scope="session")
def tokenizer(corpus):
    from nvium_dist.data.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(corpus["model"])
