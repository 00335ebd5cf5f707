"""Streaming, multiprocess tokenisation of JSONL/text corpora into Megatron ``.bin/.idx`` datasets.

Design (see tools/preprocess_data.py for the CLI):

* Inputs are streamed line by line (JSONL, plain or gzip) and cut into ~1 MiB chunks of raw lines;
  a text file is one document and travels as its path. Memory is bounded by
  ``window`` chunks in flight, whatever the corpus size. (``multiprocessing.Pool.imap`` itself is
  not bounded: its feeder thread drains the whole input iterator into the task queue, so a
  terabyte corpus would be read into memory; ``ordered_imap`` below keeps imap's ordered-result
  semantics with a fixed window.)
* Workers (``spawn`` processes, each loading the SentencePiece model once) parse JSON, extract the
  keys and tokenise; results come back in input order, so the output bytes do not depend on the
  number of workers or on chunking.
* Documents are appended with megatron-core's ``IndexedDatasetBuilder`` (uint16 tokens when the
  vocabulary has < 65500 entries, int32 otherwise) to ``OUT_<key>_document.bin.tmp`` /
  ``.idx.tmp``; both are renamed into place only when complete, the summary JSON last.
* ``partitions`` > 1 splits the list of input files into that many contiguous groups (balanced
  by size); each becomes a finished partial dataset in ``OUT.partitions.tmp/`` with a done-marker,
  and the parts are concatenated with the builder's ``add_index``. A re-run after an interruption
  reuses every partition whose inputs, tokenizer and options are unchanged.
* Malformed JSON, non-object lines, missing keys, non-string values, empty and oversized
  documents are counted per reason with their first file:line positions and skipped;
  ``strict=True`` makes the first one fatal.

Only numpy/sentencepiece are imported at module level (workers stay light); megatron-core and
tqdm are imported in the parent when writing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections import deque
from typing import Iterable, Iterator

import numpy as np

from .indexed import check_dtype_fits, dtype_for_vocab
from .inputs import expand_inputs, input_kind, open_binary

CHUNK_BYTES = 1 << 20
CHUNK_LINES = 8192
MAX_FIRST_POSITIONS = 10
# reasons that --strict does not treat as errors (harmless formatting)
NON_FATAL_REASONS = {"blank_line"}


class PreprocessError(RuntimeError):
    """A fatal problem with the input under --strict, or an unusable option."""


# ----------------------------------------------------------------------------------- worker side
_W: dict = {}


def _init_worker(model_path: str, json_keys: tuple, append_eod: bool, dtype_name: str, max_doc_bytes: int) -> None:
    # never raise here: multiprocessing.Pool replaces a worker whose initializer fails, forever (a
    # hang); the error is kept and re-raised by the first task, which reaches the parent instead
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.Load(model_path)
    except Exception as err:  # noqa: BLE001
        _W["init_error"] = f"worker could not load tokenizer {model_path!r}: {err!r}"
        return
    _W.update(sp=sp, keys=json_keys, eod=sp.eos_id(), append_eod=append_eod, dtype=np.dtype(dtype_name),
              max_doc_bytes=max_doc_bytes)


def _encode_docs(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if not texts:
        return np.zeros(0, dtype=_W["dtype"]), np.zeros(0, dtype=np.int64)
    ids = _W["sp"].Encode(texts, out_type=int, num_threads=1)
    if _W["append_eod"]:
        eod = _W["eod"]
        for x in ids:
            x.append(eod)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=_W["dtype"], count=int(lengths.sum()))
    return flat, lengths


def _process_task(task):
    """task -> (n_lines, {key: (tokens, lengths)}, [(reason, file_index, line, key)])"""
    if "init_error" in _W:
        raise RuntimeError(_W["init_error"])
    keys = _W["keys"]
    texts: dict[str, list[str]] = {k: [] for k in keys}
    skipped = []
    kind, fi = task[0], task[1]
    if kind == "text":
        path = task[2]
        n = 1
        if os.path.getsize(path) > _W["max_doc_bytes"] and not path.endswith(".gz"):
            skipped.extend(("too_large", fi, 0, k) for k in keys)
        else:
            from .inputs import read_text_file

            text = read_text_file(path)
            if len(text) > _W["max_doc_bytes"]:
                skipped.extend(("too_large", fi, 0, k) for k in keys)
            elif not text.strip():
                skipped.extend(("empty", fi, 0, k) for k in keys)
            else:
                for k in keys:
                    texts[k].append(text)
    else:
        first_line, lines = task[2], task[3]
        n = len(lines)
        for j, raw in enumerate(lines):
            line_no = first_line + j
            if not raw.strip():
                skipped.append(("blank_line", fi, line_no, None))
                continue
            if len(raw) > _W["max_doc_bytes"]:
                skipped.append(("too_large", fi, line_no, None))
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError:
                skipped.append(("invalid_utf8", fi, line_no, None))
                continue
            except ValueError:
                skipped.append(("invalid_json", fi, line_no, None))
                continue
            if not isinstance(obj, dict):
                skipped.append(("not_an_object", fi, line_no, None))
                continue
            for k in keys:
                if k not in obj:
                    skipped.append(("missing_key", fi, line_no, k))
                    continue
                v = obj[k]
                if not isinstance(v, str):
                    skipped.append(("not_a_string", fi, line_no, k))
                elif not v.strip():
                    skipped.append(("empty", fi, line_no, k))
                else:
                    texts[k].append(v)
    return n, {k: _encode_docs(texts[k]) for k in keys}, skipped


# ----------------------------------------------------------------------------------- parent side
def iter_tasks(files: list[str], file_offset: int = 0, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple]:
    """Stream (kind, file_index, ...) tasks; JSONL lines in chunks of ~chunk_bytes."""
    for i, path in enumerate(files):
        fi = file_offset + i
        if input_kind(path) == "text":
            yield ("text", fi, path)
            continue
        with open_binary(path) as f:
            lines: list[bytes] = []
            size, first, line_no = 0, 1, 0
            for raw in f:
                line_no += 1
                lines.append(raw)
                size += len(raw)
                if size >= chunk_bytes or len(lines) >= CHUNK_LINES:
                    yield ("jsonl", fi, first, lines)
                    lines, size, first = [], 0, line_no + 1
            if lines:
                yield ("jsonl", fi, first, lines)


def ordered_imap(pool, fn, tasks: Iterable, window: int) -> Iterator:
    """Like ``pool.imap(fn, tasks)`` (ordered results) but with at most ``window`` tasks in flight."""
    pending: deque = deque()
    for t in tasks:
        pending.append(pool.apply_async(fn, (t,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def output_name(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def _partition_files(files: list[str], partitions: int) -> list[list[int]]:
    """Contiguous groups of file indices with roughly equal total size (order preserved)."""
    partitions = max(1, min(partitions, len(files)))
    sizes = [max(1, os.path.getsize(f)) for f in files]
    target = sum(sizes) / partitions
    groups: list[list[int]] = [[]]
    acc = 0
    for i, s in enumerate(sizes):
        files_left = len(files) - i
        groups_left = partitions - len(groups)
        if groups[-1] and groups_left > 0 and (acc >= target * len(groups) or files_left <= groups_left):
            groups.append([])
        groups[-1].append(i)
        acc += s
    return groups


def _fingerprint(files: list[str], idx: list[int], options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for i in idx:
        st = os.stat(files[i])
        h.update(f"{os.path.abspath(files[i])}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class _Stats:
    def __init__(self, keys):
        self.lines = 0
        self.documents = {k: 0 for k in keys}
        self.tokens = {k: 0 for k in keys}
        self.skipped: dict[str, dict] = {}

    def skip(self, reason, path, line, key):
        entry = self.skipped.setdefault(reason, {"count": 0, "first": []})
        entry["count"] += 1
        if len(entry["first"]) < MAX_FIRST_POSITIONS:
            pos = {"file": path, "line": line}
            if key is not None:
                pos["key"] = key
            entry["first"].append(pos)

    def to_json(self):
        return {"lines": self.lines, "documents": self.documents, "tokens": self.tokens, "skipped": self.skipped}

    def add_json(self, d):
        self.lines += d["lines"]
        for k in self.documents:
            self.documents[k] += d["documents"][k]
            self.tokens[k] += d["tokens"][k]
        for reason, e in d["skipped"].items():
            mine = self.skipped.setdefault(reason, {"count": 0, "first": []})
            mine["count"] += e["count"]
            mine["first"] = (mine["first"] + e["first"])[:MAX_FIRST_POSITIONS]


def _remove(*paths):
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _import_builder():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        warnings.filterwarnings("ignore", message=".*tp_group is None.*")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


def _run_partition(files, idx, prefixes, keys, dtype, worker_args, workers, strict, stats, bar, chunk_bytes):
    """Tokenise files[idx] into builders at prefixes[key] (+'.bin'/'.idx' given by caller)."""
    IndexedDatasetBuilder = _import_builder()
    builders = {k: IndexedDatasetBuilder(prefixes[k][0], dtype=dtype) for k in keys}
    sub = [files[i] for i in idx]
    tasks = iter_tasks(sub, file_offset=idx[0] if idx else 0, chunk_bytes=chunk_bytes)
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=worker_args)
        results = ordered_imap(pool, _process_task, tasks, window=4 * workers)
    else:
        pool = None
        _init_worker(*worker_args)
        results = map(_process_task, tasks)
    try:
        for n_lines, per_key, skipped in results:
            stats.lines += n_lines
            for reason, fi, line, key in skipped:
                if strict and reason not in NON_FATAL_REASONS:
                    where = f"{files[fi]}:{line}" if line else files[fi]
                    what = f" (key {key!r})" if key else ""
                    raise PreprocessError(
                        f"{where}: {reason.replace('_', ' ')}{what}; --strict makes malformed input fatal. "
                        f"Fix the input or drop --strict to skip and count such lines."
                    )
                stats.skip(reason, files[fi], line, key)
            docs_here = 0
            for k, (tokens, lengths) in per_key.items():
                b = builders[k]
                off = 0
                for n in lengths.tolist():
                    b.add_document(tokens[off:off + n], [n])
                    off += n
                stats.documents[k] += len(lengths)
                stats.tokens[k] += off
                docs_here = max(docs_here, len(lengths))
            if bar is not None:
                bar.tokens_total = getattr(bar, "tokens_total", 0) + sum(int(v[1].sum()) for v in per_key.values())
                el = max(time.time() - bar.start_t, 1e-9)
                bar.set_postfix_str(f"{bar.tokens_total / el:,.0f} tok/s", refresh=False)
                bar.update(docs_here)
        for k in keys:
            builders[k].finalize(prefixes[k][1])
    except BaseException:
        for k in keys:
            try:
                builders[k].data_file.close()
            except Exception:
                pass
            _remove(*prefixes[k])
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def preprocess(
    inputs: list[str] | str,
    output_prefix: str,
    tokenizer_model: str,
    json_keys: list[str] | tuple = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    partitions: int = 1,
    strict: bool = False,
    dtype: str = "auto",
    progress: bool = True,
    max_document_bytes: int = 256 << 20,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Tokenise inputs into ``OUT_<key>_document.bin/.idx``; write and return the summary(ies).

    Returns {key: summary dict}; each summary is also written to ``OUT_<key>_document.summary.json``.
    """
    from .tokenizer import SentencePieceTokenizer

    _import_builder()  # megatron-core import (~5 s) is not part of the measured time
    t0 = time.time()
    files = expand_inputs(inputs)
    keys = list(json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys must name distinct keys, got {keys}")
    if workers < 1 or partitions < 1:
        raise PreprocessError("--workers and --partitions must be >= 1")
    tok = SentencePieceTokenizer(tokenizer_model)
    if dtype == "auto":
        np_dtype = dtype_for_vocab(tok.vocab_size)
    else:
        np_dtype = {"uint16": np.uint16, "int32": np.int32}[dtype]
    check_dtype_fits(np_dtype, tok.vocab_size, output_prefix + f"_{keys[0]}_document.bin")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    finals = {k: output_name(output_prefix, k) for k in keys}
    worker_args = (os.path.abspath(tokenizer_model), tuple(keys), bool(append_eod), np.dtype(np_dtype).name,
                   int(max_document_bytes))
    options = {"tokenizer_sha256": tok.sha256, "keys": keys, "append_eod": bool(append_eod),
               "dtype": np.dtype(np_dtype).name, "max_document_bytes": int(max_document_bytes)}
    stats = _Stats(keys)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" docs", desc=f"tokenising {len(files)} file(s)", mininterval=1.0, dynamic_ncols=True)
    groups = _partition_files(files, partitions)
    tmp = {k: (finals[k] + ".bin.tmp", finals[k] + ".idx.tmp") for k in keys}
    try:
        if len(groups) == 1:
            _run_partition(files, groups[0], tmp, keys, np_dtype, worker_args, workers, strict, stats, bar, chunk_bytes)
            reused = 0
        else:
            IndexedDatasetBuilder = _import_builder()
            part_dir = output_prefix + ".partitions.tmp"
            os.makedirs(part_dir, exist_ok=True)
            reused = 0
            part_prefixes = []
            for p, idx in enumerate(groups):
                fp = _fingerprint(files, idx, options)
                pp = {k: os.path.join(part_dir, f"p{p:05d}_{k}_document") for k in keys}
                part_prefixes.append(pp)
                done = os.path.join(part_dir, f"p{p:05d}.done.json")
                if os.path.exists(done):
                    with open(done) as f:
                        marker = json.load(f)
                    if marker.get("fingerprint") == fp and all(
                        os.path.exists(pp[k] + ".bin") and os.path.exists(pp[k] + ".idx") for k in keys
                    ):
                        stats.add_json(marker["stats"])
                        reused += 1
                        if bar is not None:
                            bar.update(max(marker["stats"]["documents"].values()))
                        continue
                    _remove(done)
                part_stats = _Stats(keys)
                ptmp = {k: (pp[k] + ".bin.tmp", pp[k] + ".idx.tmp") for k in keys}
                _run_partition(files, idx, ptmp, keys, np_dtype, worker_args, workers, strict, part_stats,
                               bar, chunk_bytes)
                for k in keys:
                    os.replace(ptmp[k][0], pp[k] + ".bin")
                    os.replace(ptmp[k][1], pp[k] + ".idx")
                with open(done + ".tmp", "w") as f:
                    json.dump({"fingerprint": fp, "files": [files[i] for i in idx], "stats": part_stats.to_json()}, f)
                os.replace(done + ".tmp", done)
                stats.add_json(part_stats.to_json())
            for k in keys:
                builder = IndexedDatasetBuilder(tmp[k][0], dtype=np_dtype)
                try:
                    for pp in part_prefixes:
                        builder.add_index(pp[k])
                    builder.finalize(tmp[k][1])
                except BaseException:
                    builder.data_file.close()
                    _remove(*tmp[k])
                    raise
    except BaseException:
        for k in keys:
            _remove(*tmp[k])
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.time() - t0
    summaries = {}
    for k in keys:
        os.replace(tmp[k][0], finals[k] + ".bin")
        os.replace(tmp[k][1], finals[k] + ".idx")
        summary = {
            "output_prefix": finals[k],
            "bin": finals[k] + ".bin",
            "idx": finals[k] + ".idx",
            "json_key": k,
            "documents": stats.documents[k],
            "tokens": stats.tokens[k],
            "lines_read": stats.lines,
            "skipped": stats.skipped,
            "skipped_total": sum(e["count"] for e in stats.skipped.values()),
            "seconds": round(seconds, 3),
            "docs_per_s": round(stats.documents[k] / max(seconds, 1e-9), 1),
            "tokens_per_s": round(stats.tokens[k] / max(seconds, 1e-9), 1),
            "workers": workers,
            "partitions": len(groups),
            "partitions_reused": reused,
            "dtype": np.dtype(np_dtype).name,
            "append_eod": bool(append_eod),
            "tokenizer": {"model": os.path.abspath(tokenizer_model), "sha256": tok.sha256,
                          "vocab_size": tok.vocab_size, "eod": tok.eod},
            "inputs": files,
            "strict": bool(strict),
        }
        path = finals[k] + ".summary.json"
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        os.replace(path + ".tmp", path)
        summaries[k] = summary
    if len(groups) > 1:
        shutil.rmtree(output_prefix + ".partitions.tmp", ignore_errors=True)
    return summaries
