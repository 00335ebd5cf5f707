import json
import os
import shutil

import numpy as np
import pytest

from data_fixtures import corpus, run_tool, tokenizer  # noqa: F401


def _copy(prefix, dst):
    for ext in (".bin", ".idx", ".summary.json"):
        shutil.copy(prefix + ext, str(dst) + ext)
    return str(dst)


def test_merge_keeps_documents_and_order(corpus, tmp_path):  # noqa: F811
    from nvium_dist.data import open_indexed_dataset

    from nvium_dist.data import merge_datasets

    out = tmp_path / "ab_text_document"
    merge_datasets([corpus["a"], corpus["b"] + ".bin"], str(out))
    a, b, m = (open_indexed_dataset(p) for p in (corpus["a"], corpus["b"], str(out)))
    na, nb = len(a.document_indices) - 1, len(b.document_indices) - 1
    assert len(m.document_indices) - 1 == na + nb
    # index invariants
    d = m.document_indices
    assert d[0] == 0 and d[-1] == len(m.sequence_lengths) and np.all(np.diff(d) >= 0)
    assert np.array_equal(m.index.sequence_pointers[1:] - m.index.sequence_pointers[:-1],
                          m.sequence_lengths[:-1].astype(np.int64) * 2)
    for i in range(na):
        assert np.array_equal(m[i], a[i])
    for i in range(nb):
        assert np.array_equal(m[na + i], b[i])
    s = json.load(open(str(out) + ".summary.json"))
    assert s["documents"] == na + nb and s["tokenizer"]["vocab_size"] == 1000
    r = run_tool("inspect_dataset.py", out, "--tokenizer-model", corpus["model"], "--show", 1)
    assert r.returncode == 0, r.stderr
    assert f'"documents": {na + nb}' in r.stdout and "histogram" in r.stdout
    assert corpus["texts"]["a"][0][:60] in r.stdout


def test_truncated_and_corrupt_files_are_named(corpus, tmp_path):  # noqa: F811
    from nvium_dist.data import DatasetFormatError, open_indexed_dataset

    cases = {}
    p = _copy(corpus["a"], tmp_path / "trunc_idx")
    with open(p + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(p + ".idx") - 8)
    cases[p + ".idx"] = "truncated"
    p = _copy(corpus["a"], tmp_path / "trunc_bin")
    with open(p + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(p + ".bin") - 2)
    cases[p + ".bin"] = "truncated"
    p = _copy(corpus["a"], tmp_path / "magic")
    with open(p + ".idx", "r+b") as f:
        f.write(b"GARBAGE!!")
    cases[p + ".idx"] = "not a Megatron index"
    p = _copy(corpus["a"], tmp_path / "tiny")
    with open(p + ".idx", "r+b") as f:
        f.truncate(10)
    cases[p + ".idx"] = "truncated"
    p = _copy(corpus["a"], tmp_path / "pointers")
    with open(p + ".idx", "r+b") as f:  # corrupt the second sequence pointer
        seq = int(np.frombuffer(open(p + ".idx", "rb").read()[18:26], dtype=np.uint64)[0])
        f.seek(34 + 4 * seq + 8)
        f.write(np.int64(12345).tobytes())
    cases[p + ".idx"] = "pointers"
    for path, words in cases.items():
        with pytest.raises(DatasetFormatError) as e:
            open_indexed_dataset(path[:-4])
        assert path in str(e.value) and words in str(e.value) and "preprocess_data.py" in str(e.value), str(e.value)
    with pytest.raises(DatasetFormatError) as e:
        open_indexed_dataset(str(tmp_path / "missing_text_document"))
    assert "missing_text_document.idx" in str(e.value) and "prefix" in str(e.value)
    # the CLI reports the same error cleanly
    r = run_tool("inspect_dataset.py", tmp_path / "trunc_bin")
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr
    r = run_tool("merge_datasets.py", "--inputs", corpus["a"], tmp_path / "magic", "--output-prefix", tmp_path / "m")
    assert r.returncode == 2 and "magic.idx" in r.stderr


def test_data_from_other_tokenizer_is_refused(corpus, tmp_path):  # noqa: F811
    from nvium_dist.data import DatasetFormatError, SentencePieceTokenizer
    from nvium_dist.data.gpt_data import check_dataset_tokenizer
    from nvium_dist.data.spm_train import train_sentencepiece

    other = train_sentencepiece(iter(corpus["texts"]["b"]), str(tmp_path / "other"), vocab_size=500, num_threads=1)
    with pytest.raises(DatasetFormatError) as e:
        check_dataset_tokenizer(corpus["a"], SentencePieceTokenizer(other["model"]))
    assert corpus["a"] in str(e.value) and "--tokenizer-model" in str(e.value)
