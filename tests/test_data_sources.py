"""preprocess_data.py beyond JSONL: Hugging Face datasets (save_to_disk, parquet, arrow, a cached name,
streaming), pre-tokenized ids, and hostile input (lone surrogates, corrupt .gz, empty runs, directories
holding non-corpus files, SIGTERM, a line far larger than the document cap)."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import TOOLS, corpus, run_tool, tokenizer  # noqa: F401
from test_data_preprocess import _docs

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"


def messy_rows(texts):
    """Good documents with a few the accounting must skip: not a string, empty, a lone surrogate."""
    return [texts[0], 42, texts[1], "   ", "bad \ud800 surrogate", texts[2], None, texts[3]]


def write_jsonl(path, key, values):
    with open(path, "w") as f:
        for value in values:
            f.write(json.dumps({key: value, "meta": 1}) + "\n")


def cache_as_hub_dataset(parquet, cache_root: Path, name: str):
    """Prepares `parquet` in the layout `load_dataset(name)` leaves in HF_DATASETS_CACHE after a download."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, dataset = name.split("/")
    builder = Parquet(cache_dir=str(cache_root / "build"), dataset_name=dataset, data_files={"train": str(parquet)})
    builder.download_and_prepare(output_dir=str(cache_root / f"{namespace}___{dataset}" / "default" / "0.0.0" / "hash"))


def read_bytes(prefix):
    return {ext: Path(prefix + ext).read_bytes() for ext in (".bin", ".idx")}


def test_hf_datasets_give_the_jsonl_bytes(corpus, tmp_path, monkeypatch):  # noqa: F811
    import datasets

    from nvium_dist.data.preprocess import preprocess

    texts = corpus["texts"]["b"][:12]
    rows = messy_rows(texts)
    write_jsonl(tmp_path / "docs.jsonl", "text", rows)
    # arrow holds valid UTF-8 only, so a dataset cannot carry the lone surrogate: an empty row stands in
    column = [(r if "\ud800" not in r else "") if isinstance(r, str) else None for r in rows]
    dataset = datasets.Dataset.from_dict({"text": column, "meta": [1] * len(rows)})
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    dataset.select(range(4)).to_parquet(str(tmp_path / "parquet" / "part-0.parquet"))
    dataset.select(range(4, len(rows))).to_parquet(str(tmp_path / "parquet" / "part-1.parquet"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # read at import: patch it
    cache_as_hub_dataset(tmp_path / "parquet" / "part-0.parquet", tmp_path / "hf_cache", "tinyorg/tinycorpus")

    # the JSONL through the CLI with 2 workers; 42 is "not a string" in JSONL and None in the dataset: both
    # are counted as not_a_string
    r = run_tool("preprocess_data.py", "--input", tmp_path / "docs.jsonl", "--tokenizer-model", corpus["model"],
                 "--output-prefix", tmp_path / "jsonl", "--append-eod", "--no-progress", "--workers", 2)
    assert r.returncode == 0, r.stderr
    reference = read_bytes(str(tmp_path / "jsonl_text_document"))
    summary = json.loads((tmp_path / "jsonl_text_document.summary.json").read_text())
    assert summary["documents"] == 4
    assert {k: v["count"] for k, v in summary["skipped"].items()} == {"not_a_string": 2, "empty": 1,
                                                                      "lone_surrogate": 1}
    assert summary["skipped"]["lone_surrogate"]["first"] == [{"file": str(tmp_path / "docs.jsonl"), "line": 5,
                                                              "key": "text"}]
    sources = {"save_to_disk": (str(tmp_path / "saved"), "train", False, 2),
               "dataset_dict": (str(tmp_path / "saved_dict"), "validation", False, 1),
               "parquet_dir_streaming": (str(tmp_path / "parquet"), "train", True, 2),
               "arrow_glob": (str(tmp_path / "saved" / "*.arrow"), "train", False, 1)}
    for name, (source, split, streaming, workers) in sources.items():
        out = preprocess(None, str(tmp_path / name), corpus["model"], append_eod=True, workers=workers,
                         progress=False, hf_dataset=source, hf_split=split, hf_streaming=streaming)["text"]
        assert read_bytes(out["output_prefix"]) == reference, name
        assert out["documents"] == 4 and out["skipped"]["empty"]["first"][1]["line"] == 5
        assert out["hf_dataset"] == {"name": source, "split": split, "streaming": streaming}
    # a dataset name from the local cache (the first four rows only)
    out = preprocess(None, str(tmp_path / "cached"), corpus["model"], append_eod=True, progress=False,
                     hf_dataset="tinyorg/tinycorpus", hf_streaming=True)["text"]
    assert _docs(out["output_prefix"]) == _docs(str(tmp_path / "jsonl_text_document"))[:2]


def test_hf_dataset_errors_are_one_line(corpus, tmp_path):  # noqa: F811
    import datasets

    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "dict"))
    from nvium_dist.data.preprocess import PreprocessError, preprocess

    r = run_tool("preprocess_data.py", "--hf-dataset", tmp_path / "saved", "--tokenizer-model", corpus["model"],
                 "--output-prefix", tmp_path / "out", "--no-progress")
    assert r.returncode == 2 and "has no column 'text'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for source, split, words in ((tmp_path / "dict", "test", "splits ['train'], not 'test'"),
                                 ("nobody/not-cached-anywhere", "train", "offline")):
        with pytest.raises(PreprocessError, match=words.replace("[", r"\[").replace("]", r"\]")):
            preprocess(None, str(tmp_path / "out"), corpus["model"], progress=False, hf_dataset=str(source),
                       hf_split=split)
    assert not list(tmp_path.glob("out*"))


def test_pretokenized_ids(tmp_path):
    import datasets

    from nvium_dist.data.preprocess import PreprocessError, preprocess

    rows = [[5, 6, 7], [1, 999], "not ids", [], [3.5, 2], [0, 100, 42], [-1], [99], {"a": 1}]
    write_jsonl(tmp_path / "ids.jsonl", "input_ids", rows)
    # no tokenizer at all: ids are checked against --vocab-size, eod comes from --eod-id
    r = run_tool("preprocess_data.py", "--input", tmp_path / "ids.jsonl", "--input-ids-key", "input_ids",
                 "--vocab-size", 101, "--eod-id", 2, "--append-eod", "--output-prefix", tmp_path / "pre",
                 "--no-progress", "--workers", 2)
    assert r.returncode == 0, r.stderr
    prefix = str(tmp_path / "pre_input_ids_document")
    assert _docs(prefix) == [[5, 6, 7, 2], [0, 100, 42, 2], [99, 2]]
    summary = json.loads(Path(prefix + ".summary.json").read_text())
    assert summary["id_range"] == [0, 100] and summary["pretokenized"] and summary["dtype"] == "uint16"
    assert summary["tokenizer"] == {"model": None, "sha256": None, "vocab_size": 101, "eod": 2}
    skipped = {k: [p["line"] for p in v["first"]] for k, v in summary["skipped"].items()}
    assert skipped == {"id_out_of_range": [2, 7], "not_a_list": [3, 5, 9], "empty": [4]}
    # the same ids as a dataset column (None where JSONL had non-lists) give the same bytes
    column = [r if isinstance(r, list) and all(isinstance(i, int) for i in r) else None for r in rows]
    datasets.Dataset.from_dict({"input_ids": column}).save_to_disk(str(tmp_path / "saved"))
    out = preprocess(None, str(tmp_path / "ds"), None, input_ids_key="input_ids", vocab_size=101, eod_id=2,
                     append_eod=True, progress=False, hf_dataset=str(tmp_path / "saved"))["input_ids"]
    assert read_bytes(out["output_prefix"]) == read_bytes(prefix)
    # --strict names the first bad record; ids need a vocabulary to be checked against
    with pytest.raises(PreprocessError, match=f"{tmp_path / 'ids.jsonl'}:2: id out of range"):
        preprocess([str(tmp_path / "ids.jsonl")], str(tmp_path / "strict"), None, input_ids_key="input_ids",
                   vocab_size=101, strict=True, progress=False)
    with pytest.raises(PreprocessError, match="--vocab-size"):
        preprocess([str(tmp_path / "ids.jsonl")], str(tmp_path / "novocab"), None, input_ids_key="input_ids",
                   progress=False)
    assert not list(tmp_path.glob("strict*")) and not list(tmp_path.glob("novocab*"))


def test_hostile_inputs(corpus, tmp_path):  # noqa: F811
    from nvium_dist.data.preprocess import PreprocessError, preprocess

    model = corpus["model"]
    texts = corpus["texts"]["b"]
    # lone surrogates: a JSON escape and raw bytes ED A0 80 (json decodes them leniently)
    (tmp_path / "sur.jsonl").write_bytes(json.dumps({"text": texts[0]}).encode() + b"\n"
                                         + b'{"text": "raw \xed\xa0\x80 bytes"}\n'
                                         + json.dumps({"text": "esc \ud800"}).encode() + b"\n")
    summary = preprocess([str(tmp_path / "sur.jsonl")], str(tmp_path / "sur"), model, progress=False)["text"]
    assert summary["documents"] == 1 and [p["line"] for p in summary["skipped"]["lone_surrogate"]["first"]] == [2, 3]
    with pytest.raises(PreprocessError, match=f"{tmp_path / 'sur.jsonl'}:2: lone surrogate"):
        preprocess([str(tmp_path / "sur.jsonl")], str(tmp_path / "sur_strict"), model, progress=False, strict=True)

    # a truncated .gz: an error naming the file, no traceback, no output
    data = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts[:20]).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    r = run_tool("preprocess_data.py", "--input", tmp_path / "cut.jsonl.gz", "--tokenizer-model", model,
                 "--output-prefix", tmp_path / "cut", "--no-progress", "--workers", 2)
    assert r.returncode == 2 and str(tmp_path / "cut.jsonl.gz") in r.stderr and "truncated or corrupt" in r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.glob("cut_*"))

    # nothing survives: an error unless --allow-empty
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "wrongkey.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    r = run_tool("preprocess_data.py", "--input", tmp_path / "wrongkey.jsonl", "--tokenizer-model", model,
                 "--output-prefix", tmp_path / "out_wrongkey", "--no-progress")
    assert r.returncode == 2 and "no document was written" in r.stderr and "1 missing_key" in r.stderr
    assert "--allow-empty" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(PreprocessError, match="0 record"):
        preprocess([str(tmp_path / "empty.jsonl")], str(tmp_path / "out_empty"), model, progress=False)
    assert not list(tmp_path.glob("out_*"))
    allowed = preprocess([str(tmp_path / "wrongkey.jsonl")], str(tmp_path / "allowed"), model, progress=False,
                         allow_empty=True)["text"]
    # its own earlier output is replaced; files it did not write are not, unless forced
    preprocess([str(tmp_path / "wrongkey.jsonl")], str(tmp_path / "allowed"), model, progress=False, allow_empty=True)
    (tmp_path / "foreign_text_document.bin").write_bytes(b"someone else's")
    with pytest.raises(PreprocessError, match="not written by preprocess_data.py"):
        preprocess([str(tmp_path / "wrongkey.jsonl")], str(tmp_path / "foreign"), model, progress=False,
                   allow_empty=True)
    assert (tmp_path / "foreign_text_document.bin").read_bytes() == b"someone else's"
    preprocess([str(tmp_path / "wrongkey.jsonl")], str(tmp_path / "foreign"), model, progress=False,
               allow_empty=True, force=True)
    assert allowed["documents"] == 0 and os.path.isfile(allowed["idx"]) and os.path.getsize(allowed["bin"]) == 0

    # a directory holding a tokenizer model and a README next to the corpus reads only the corpus
    corpus_dir = tmp_path / "dir"
    (corpus_dir / "nested").mkdir(parents=True)
    write_jsonl(corpus_dir / "a.jsonl", "text", texts[:2])
    (corpus_dir / "nested" / "b.txt").write_text(texts[2])
    (corpus_dir / "tok.model").write_bytes(Path(model).read_bytes())
    (corpus_dir / "README").write_text("not a document")
    r = run_tool("preprocess_data.py", "--input", corpus_dir, "--tokenizer-model", model,
                 "--output-prefix", tmp_path / "dirout", "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "dirout_text_document.summary.json").read_text())
    assert summary["documents"] == 3
    assert sorted(summary["ignored_inputs"]) == [str(corpus_dir / "README"), str(corpus_dir / "tok.model")]
    assert "ignored 2 non-corpus file(s)" in r.stderr


def test_oversized_line_is_skipped_without_being_held(corpus, tmp_path):  # noqa: F811
    """A 100 MB line under a 1 MiB cap: skipped and counted, and the process never holds it (its peak
    memory stays within 40 MB of a run over the same file without that line)."""
    texts = corpus["texts"]["b"][:3]
    small = tmp_path / "small.jsonl"
    write_jsonl(small, "text", texts)
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        f.write(json.dumps({"text": texts[0]}) + "\n")
        f.write('{"text": "' + "x" * (100 << 20) + '"}\n')
        for t in texts[1:]:
            f.write(json.dumps({"text": t}) + "\n")
    code = ("import resource, runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], "
            "run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    peaks = {}
    for name, path in (("small", small), ("big", big)):
        r = subprocess.run([sys.executable, "-c", code, os.path.join(TOOLS, "preprocess_data.py"), "--input", path,
                            "--tokenizer-model", corpus["model"], "--output-prefix", tmp_path / name,
                            "--no-progress", "--max-document-bytes", str(1 << 20)],
                           capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert r.returncode == 0, r.stderr
        peaks[name] = int(r.stdout.split("PEAK")[-1]) / 1024
    assert _docs(str(tmp_path / "big_text_document")) == _docs(str(tmp_path / "small_text_document"))
    summary = json.loads((tmp_path / "big_text_document.summary.json").read_text())
    assert summary["skipped"]["too_large"]["first"] == [{"file": str(big), "line": 2}]
    assert peaks["big"] - peaks["small"] < 40, peaks


def test_sigterm_stops_cleanly(corpus, tmp_path):  # noqa: F811
    big = tmp_path / "many.jsonl"
    write_jsonl(big, "text", corpus["texts"]["a"] * 40)
    process = subprocess.Popen([sys.executable, os.path.join(TOOLS, "preprocess_data.py"), "--input", big,
                                "--tokenizer-model", corpus["model"], "--output-prefix", tmp_path / "out",
                                "--no-progress", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 120
    while not (tmp_path / "out_text_document.bin.tmp").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "SIGTERM: stopped; no output was renamed into place" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.jsonl"]
