import gzip
import json
import os

import numpy as np
import pytest

from data_fixtures import corpus, run_tool, tokenizer  # noqa: F401


def _docs(prefix):
    from nvium_dist.data import open_indexed_dataset

    ds = open_indexed_dataset(prefix)
    d = ds.document_indices
    return [np.concatenate([ds[i] for i in range(int(d[j]), int(d[j + 1]))]).tolist() for j in range(len(d) - 1)]


def test_round_trip(corpus, tokenizer):  # noqa: F811
    docs = _docs(corpus["a"])
    texts = corpus["texts"]["a"]
    assert len(docs) == len(texts)
    for ids, text in zip(docs, texts):
        assert ids[-1] == tokenizer.eod  # --append-eod
        assert ids[:-1] == tokenizer.encode(text)
        assert tokenizer.decode(ids) == text  # identity normalisation: exact text back
    summary = json.load(open(corpus["a"] + ".summary.json"))
    assert summary["documents"] == len(texts)
    assert summary["tokens"] == sum(map(len, docs))
    assert summary["dtype"] == "uint16" and summary["tokenizer"]["vocab_size"] == 1000
    assert summary["skipped"] == {}


def test_workers_partitions_byte_identical(corpus, tmp_path):  # noqa: F811
    root = corpus["root"]
    # several inputs of different kinds: jsonl, jsonl.gz, plain text files (one document each)
    with open(root / "a.jsonl", "rb") as f, gzip.open(tmp_path / "c.jsonl.gz", "wb") as g:
        g.write(f.read())
    for i, t in enumerate(corpus["texts"]["b"][:3]):
        (tmp_path / f"t{i}.txt").write_text(t)
    inputs = [root / "a.jsonl", tmp_path / "c.jsonl.gz", str(tmp_path / "t*.txt"), root / "b.jsonl"]
    from nvium_dist.data.preprocess import preprocess

    outs = {}
    # the CLI once (3 workers), the library in-process for the others (saves a megatron import each)
    r = run_tool("preprocess_data.py", "--input", *inputs, "--tokenizer-model", corpus["model"],
                 "--output-prefix", tmp_path / "w3", "--append-eod", "--no-progress", "--workers", 3)
    assert r.returncode == 0, r.stderr
    outs["w3"] = str(tmp_path / "w3") + "_text_document"
    for name, w, p in (("w1", 1, 1), ("w2p3", 2, 3)):
        s = preprocess([str(x) for x in inputs], str(tmp_path / name), corpus["model"], append_eod=True,
                       workers=w, partitions=p, progress=False)
        outs[name] = s["text"]["output_prefix"]
        assert s["text"]["partitions"] == p
    for ext in (".bin", ".idx"):
        ref = open(outs["w1"] + ext, "rb").read()
        assert ref == open(outs["w3"] + ext, "rb").read()
        assert ref == open(outs["w2p3"] + ext, "rb").read()
    n_a, n_b = len(corpus["texts"]["a"]), len(corpus["texts"]["b"])
    docs = _docs(outs["w3"])
    assert len(docs) == 2 * n_a + 3 + n_b
    assert docs[:n_a] == docs[n_a:2 * n_a] == _docs(corpus["a"])
    assert docs[-n_b:] == _docs(corpus["b"])
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.partitions.tmp"))


def _write_bad(path, good_texts):
    lines = [
        json.dumps({"text": good_texts[0]}),           # 1 ok
        '{"text": "unterminated',                       # 2 invalid json
        json.dumps({"body": "no text key"}),           # 3 missing key
        "",                                             # 4 blank line
        json.dumps({"text": "   "}),                   # 5 empty document
        json.dumps([1, 2]),                             # 6 not an object
        json.dumps({"text": 42}),                      # 7 not a string
        json.dumps({"text": good_texts[1]}),           # 8 ok
        "{broken",                                      # 9 invalid json
    ]
    path.write_text("\n".join(lines) + "\n")


def test_malformed_lines_counted_and_strict(corpus, tokenizer, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.jsonl"
    _write_bad(bad, corpus["texts"]["b"])
    r = run_tool("preprocess_data.py", "--input", bad, "--tokenizer-model", corpus["model"],
                 "--output-prefix", tmp_path / "out", "--no-progress", "--workers", 2)
    assert r.returncode == 0, r.stderr
    s = json.load(open(tmp_path / "out_text_document.summary.json"))
    assert s["documents"] == 2 and s["lines_read"] == 9
    sk = s["skipped"]
    assert sk["invalid_json"]["count"] == 2
    assert [p["line"] for p in sk["invalid_json"]["first"]] == [2, 9]
    assert sk["missing_key"]["first"][0]["line"] == 3 and sk["missing_key"]["first"][0]["key"] == "text"
    assert sk["blank_line"]["first"][0]["line"] == 4
    assert sk["empty"]["first"][0]["line"] == 5
    assert sk["not_an_object"]["first"][0]["line"] == 6
    assert sk["not_a_string"]["first"][0]["line"] == 7
    assert all(p["file"] == str(bad) for e in sk.values() for p in e["first"])
    assert "invalid_json" in r.stderr and f"{bad}:2" in r.stderr
    docs = _docs(str(tmp_path / "out_text_document"))
    assert docs == [tokenizer.encode(t) for t in corpus["texts"]["b"][:2]]

    from nvium_dist.data.preprocess import PreprocessError, preprocess

    with pytest.raises(PreprocessError) as e:
        preprocess([str(bad)], str(tmp_path / "strict"), corpus["model"], strict=True, workers=2, progress=False)
    assert f"{bad}:2: invalid json" in str(e.value) and "--strict" in str(e.value)
    # nothing that looks like a dataset is left behind
    assert not list(tmp_path.glob("strict*"))


def test_interrupted_run_leaves_no_valid_looking_output(corpus, tmp_path):  # noqa: F811
    from nvium_dist.data.preprocess import PreprocessError, preprocess

    bad = tmp_path / "bad.jsonl"
    _write_bad(bad, corpus["texts"]["b"])
    with pytest.raises(PreprocessError):
        preprocess([str(corpus["root"] / "a.jsonl"), str(bad)], str(tmp_path / "x"), corpus["model"],
                   strict=True, progress=False)
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_dtype_must_fit_vocab(corpus, tmp_path):  # noqa: F811
    from nvium_dist.data import DatasetFormatError, open_indexed_dataset
    from nvium_dist.data.indexed import check_dtype_fits

    with pytest.raises(DatasetFormatError) as e:
        open_indexed_dataset(corpus["a"], vocab_size=70000)
    assert corpus["a"] + ".bin" in str(e.value) and "uint16" in str(e.value) and "preprocess_data.py" in str(e.value)
    with pytest.raises(DatasetFormatError):
        check_dtype_fits(np.uint16, 65537, "x.bin")
    check_dtype_fits(np.uint16, 65536, "x.bin")
    check_dtype_fits(np.int32, 200_000, "x.bin")
    # int32 output on request, same token ids
    from nvium_dist.data.preprocess import preprocess

    preprocess([str(corpus["root"] / "b.jsonl")], str(tmp_path / "i32"), corpus["model"], append_eod=True,
               dtype="int32", progress=False)
    ds = open_indexed_dataset(str(tmp_path / "i32_text_document"))
    assert ds.index.dtype == np.int32
    assert _docs(str(tmp_path / "i32_text_document")) == _docs(corpus["b"])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_is_byte_identical_to_megatron_builder(corpus, tmp_path, dtype):  # noqa: F811
    """The documents of two real datasets, written and merged by IndexedDatasetWriter and by megatron-core's
    IndexedDatasetBuilder (one add_document per document, then add_index): the same bytes."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from nvium_dist.data.indexed import IndexedDatasetWriter

    docs = {name: [np.asarray(d, dtype=dtype) for d in _docs(corpus[name])] for name in ("a", "b")}
    for name, documents in docs.items():
        ours = IndexedDatasetWriter(f"{tmp_path}/ours_{name}.bin", dtype)
        half = len(documents) // 2  # two batches, as two worker results
        for batch in (documents[:half], documents[half:]):
            ours.add_documents(np.concatenate(batch), np.array([len(d) for d in batch]))
        ours.finalize(f"{tmp_path}/ours_{name}.idx")
        theirs = IndexedDatasetBuilder(f"{tmp_path}/theirs_{name}.bin", dtype=dtype)
        for d in documents:
            theirs.add_document(d, [len(d)])
        theirs.finalize(f"{tmp_path}/theirs_{name}.idx")
    ours, theirs = IndexedDatasetWriter(f"{tmp_path}/ours.bin", dtype), IndexedDatasetBuilder(
        f"{tmp_path}/theirs.bin", dtype=dtype)
    for name in ("a", "b"):
        ours.add_index(f"{tmp_path}/ours_{name}")
        theirs.add_index(f"{tmp_path}/theirs_{name}")
    ours.finalize(f"{tmp_path}/ours.idx")
    theirs.finalize(f"{tmp_path}/theirs.idx")
    for prefix in ("_a", "_b", ""):
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"ours{prefix}{ext}").read_bytes() == (tmp_path / f"theirs{prefix}{ext}").read_bytes()
    if dtype == np.uint16:  # and the tokeniser's own output is what megatron's builder writes for its documents
        for ext in (".bin", ".idx"):
            assert open(corpus["a"] + ext, "rb").read() == (tmp_path / f"theirs_a{ext}").read_bytes()


def test_preprocessing_never_imports_megatron(corpus, tmp_path):  # noqa: F811
    """Importing megatron-core costs seconds per process: the CLI (and its workers) must not need it."""
    import subprocess
    import sys

    from data_fixtures import REPO, TOOLS

    code = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code\n"
            "print(sorted(m for m in sys.modules if m.startswith(('megatron', 'torch'))))")
    done = subprocess.run([sys.executable, "-c", code, os.path.join(TOOLS, "preprocess_data.py"), "--input",
                           str(corpus["root"] / "a.jsonl"), "--tokenizer-model", corpus["model"], "--output-prefix",
                           str(tmp_path / "out"), "--append-eod", "--no-progress", "--workers", "2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert open(corpus["a"] + ".bin", "rb").read() == (tmp_path / "out_text_document.bin").read_bytes()
