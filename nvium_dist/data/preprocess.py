"""Streaming, multiprocess tokenisation of JSONL/text corpora and Hugging Face datasets into Megatron
``.bin/.idx`` datasets; pre-tokenized ids are written as given.

Design (see tools/preprocess_data.py for the CLI):

* Inputs are streamed line by line (JSONL, plain or gzip; a line is read at most ``max_document_bytes``
  at a time, so an oversized line is skipped without ever being held) and cut into ~1 MiB chunks of raw
  lines; a text file is one document and travels as its path. A Hugging Face dataset (save_to_disk
  directory, parquet/arrow files or a cached name; ``nvium_dist.data.hf_source``) travels as chunks of
  rows of the selected columns. Memory is bounded by ``window`` chunks in flight, whatever the corpus size,
  plus the tokenizer's working memory for the largest document (~50x its size). (``multiprocessing.Pool.imap`` itself is
  not bounded: its feeder thread drains the whole input iterator into the task queue, so a
  terabyte corpus would be read into memory; ``ordered_imap`` below keeps imap's ordered-result
  semantics with a fixed window.)
* Workers (``spawn`` processes, each loading the SentencePiece model once) parse JSON, extract the
  keys and tokenise; results come back in input order, so the output bytes do not depend on the
  number of workers or on chunking.
* Each worker result (a chunk's documents) is appended in one write by ``IndexedDatasetWriter``, which
  writes megatron-core's format byte for byte without importing it (uint16 tokens when the vocabulary
  has < 65500 entries, int32 otherwise) to ``OUT_<key>_document.bin.tmp`` / ``.idx.tmp``; both are
  renamed into place only when complete, the summary JSON last.
* ``partitions`` > 1 splits the list of input files into that many contiguous groups (balanced
  by size); each becomes a finished partial dataset in ``OUT.partitions.tmp/`` with a done-marker,
  and the parts are concatenated with the writer's ``add_index``. A re-run after an interruption
  reuses every partition whose inputs, tokenizer and options are unchanged.
* Malformed JSON, non-object lines, missing keys, non-string values, empty and oversized
  documents, text with lone UTF-16 surrogates (which SentencePiece cannot encode), and, for
  pre-tokenized ids, values that are not lists of ints or hold ids outside the vocabulary are counted
  per reason with their first file:line positions (dataset rows: the 1-based row number) and skipped;
  ``strict=True`` makes the first one fatal. A truncated or corrupt input file is an error naming it.
* A run that writes no document is an error unless ``allow_empty``.

Only numpy/sentencepiece are imported (workers stay light; tqdm in the parent for the progress bar):
megatron-core is never imported on this path.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import threading
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import numpy as np

from .indexed import IndexedDatasetWriter, check_dtype_fits, dtype_for_vocab
from .inputs import expand_inputs, input_kind, open_binary, read_text_file

CHUNK_BYTES = 1 << 20
CHUNK_LINES = 8192
# Tokenising a document takes up to ~50x its size in memory (measured with SentencePiece 0.2: a 32 MiB
# document peaked at 1.4 GB), so this default bounds each worker to about 0.8 GB.
DEFAULT_MAX_DOCUMENT_BYTES = 16 << 20
MAX_FIRST_POSITIONS = 10
# reasons that --strict does not treat as errors (harmless formatting)
NON_FATAL_REASONS = {"blank_line"}


class PreprocessError(RuntimeError):
    """A fatal problem with the input under --strict, or an unusable option."""


# ----------------------------------------------------------------------------------- worker side
@dataclass(frozen=True)
class DocumentFormat:
    """What a worker needs to turn records into token arrays (picklable, sent once per worker)."""
    keys: tuple  # JSON keys / dataset columns, one output dataset each
    tokenizer_model: str | None  # None: the values are pre-tokenized id lists
    append_eod: bool
    eod: int | None
    dtype: str
    max_document_bytes: int
    vocab_size: int


_W: dict = {}


def _init_worker(fmt: DocumentFormat) -> None:
    # never raise here: multiprocessing.Pool replaces a worker whose initializer fails, forever (a
    # hang); the error is kept and re-raised by the first task, which reaches the parent instead
    _W.update(fmt=fmt, dtype=np.dtype(fmt.dtype), sp=None)
    if fmt.tokenizer_model is None:
        return
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.Load(fmt.tokenizer_model)
    except Exception as err:  # noqa: BLE001
        _W["init_error"] = f"worker could not load tokenizer {fmt.tokenizer_model!r}: {err!r}"
        return
    _W["sp"] = sp


def _encode_texts(docs: list, skipped: list) -> list[list[int]]:
    """docs [(text, file index, line, key)] -> id lists. Text with a lone UTF-16 surrogate (JSON "\\ud800",
    or raw bytes ED A0 80, which json decodes leniently) cannot be encoded: it is skipped and counted."""
    try:
        return _W["sp"].Encode([d[0] for d in docs], out_type=int, num_threads=1)
    except (TypeError, UnicodeError, RuntimeError):
        pass
    good = []
    for doc in docs:
        try:
            doc[0].encode("utf-8")
            good.append(doc)
        except UnicodeEncodeError:
            skipped.append(("lone_surrogate", doc[1], doc[2], doc[3]))
    docs[:] = good
    return _W["sp"].Encode([d[0] for d in docs], out_type=int, num_threads=1) if docs else []


def _check_value(value, fmt: DocumentFormat):
    """A record's value -> (document or None, skip reason or None)."""
    if fmt.tokenizer_model is not None:
        if not isinstance(value, str):
            return None, "not_a_string"
        return (value, None) if value.strip() else (None, "empty")
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        return None, "not_a_list"
    ids = np.asarray(value)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        return None, "not_a_list"
    if not ids.size:
        return None, "empty"
    if int(ids.min()) < 0 or int(ids.max()) >= fmt.vocab_size:
        return None, "id_out_of_range"
    return ids.astype(np.int64), None


def _document_arrays(docs: list) -> tuple[np.ndarray, np.ndarray]:
    """id lists / arrays -> (flat tokens in the output dtype, lengths), eod appended when asked."""
    fmt = _W["fmt"]
    if fmt.append_eod:
        docs = [list(d) + [fmt.eod] for d in docs]
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    if not docs:
        return np.zeros(0, dtype=_W["dtype"]), lengths
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=_W["dtype"], count=int(lengths.sum()))
    return flat, lengths


def _process_task(task):
    """task -> (n_records, {key: (tokens, lengths)}, [(reason, file_index, line, key)])"""
    if "init_error" in _W:
        raise RuntimeError(_W["init_error"])
    fmt: DocumentFormat = _W["fmt"]
    docs: dict[str, list] = {k: [] for k in fmt.keys}  # key -> [(value, file index, line, key)]
    skipped = []
    kind, fi = task[0], task[1]

    def take(value, line, key):
        doc, reason = _check_value(value, fmt)
        if reason is not None:
            skipped.append((reason, fi, line, key))
        else:
            docs[key].append((doc, fi, line, key))

    if kind == "text":
        path = task[2]
        n = 1
        try:
            text = read_text_file(path, fmt.max_document_bytes)
        except (EOFError, OSError, zlib.error) as err:
            raise PreprocessError(f"{path}: unreadable ({type(err).__name__}: {err}); the file is truncated or "
                                  "corrupt. Repair or remove it") from None
        for k in fmt.keys:
            if text is None:
                skipped.append(("too_large", fi, 0, k))
            else:
                take(text, 0, k)
    elif kind == "rows":
        first_row, rows = task[2], task[3]
        n = len(rows)
        for j, row in enumerate(rows):
            if row is None:
                skipped.append(("too_large", fi, first_row + j, None))
                continue
            for k in fmt.keys:
                take(row[k], first_row + j, k)
    else:
        first_line, lines = task[2], task[3]
        n = len(lines)
        for j, raw in enumerate(lines):
            line_no = first_line + j
            if raw is None:
                skipped.append(("too_large", fi, line_no, None))
                continue
            if not raw.strip():
                skipped.append(("blank_line", fi, line_no, None))
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
            for k in fmt.keys:
                if k not in obj:
                    skipped.append(("missing_key", fi, line_no, k))
                else:
                    take(obj[k], line_no, k)
    out = {}
    for k in fmt.keys:
        ids = _encode_texts(docs[k], skipped) if fmt.tokenizer_model is not None else [d[0] for d in docs[k]]
        out[k] = _document_arrays(ids)
    return n, out, skipped


# ----------------------------------------------------------------------------------- parent side
def _bounded_lines(f, limit: int) -> Iterator[bytes | None]:
    """Lines of a binary file, each read at most `limit` + 1 bytes at a time: a longer line is consumed
    in pieces and yields None, so no line above the limit is ever held in memory."""
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit:
            while not raw.endswith(b"\n"):
                raw = f.readline(1 << 20)
                if not raw:
                    break
            yield None
        else:
            yield raw


def iter_tasks(files: list[str], file_offset: int = 0, chunk_bytes: int = CHUNK_BYTES,
               max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> Iterator[tuple]:
    """Stream (kind, file_index, ...) tasks; JSONL lines in chunks of ~chunk_bytes."""
    for i, path in enumerate(files):
        fi = file_offset + i
        if input_kind(path) == "text":
            yield ("text", fi, path)
            continue
        line_no = 0
        try:
            with open_binary(path) as f:
                lines: list[bytes | None] = []
                size, first = 0, 1
                for raw in _bounded_lines(f, max_document_bytes):
                    line_no += 1
                    lines.append(raw)
                    size += len(raw) if raw is not None else 0
                    if size >= chunk_bytes or len(lines) >= CHUNK_LINES:
                        yield ("jsonl", fi, first, lines)
                        lines, size, first = [], 0, line_no + 1
                if lines:
                    yield ("jsonl", fi, first, lines)
        except (EOFError, OSError, zlib.error) as err:
            raise PreprocessError(f"{path}: unreadable after line {line_no} ({type(err).__name__}: {err}); the file "
                                  "is truncated or corrupt. Repair or remove it") from None


def _row_size(row: dict, keys, limit: int) -> int:
    """Bytes of a row's values: UTF-8 text (counted exactly only when it could exceed `limit`; a character
    is at most 4 bytes) or 4 bytes per pre-tokenized id."""
    size = 0
    for k in keys:
        value = row.get(k)
        if isinstance(value, str):
            size += len(value) if len(value) * 4 <= limit else len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, (list, tuple)):
            size += 4 * len(value)
    return size


def iter_row_tasks(rows: Iterable[dict], keys, file_index: int, chunk_bytes: int = CHUNK_BYTES,
                   max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> Iterator[tuple]:
    """("rows", file_index, first row, rows) tasks from a dataset's rows; an oversized row travels as None."""
    chunk, size, first, count = [], 0, 1, 0
    for row in rows:
        count += 1
        row_size = _row_size(row, keys, max_document_bytes)
        if row_size > max_document_bytes:
            row, row_size = None, 0
        chunk.append(row)
        size += row_size
        if size >= chunk_bytes or len(chunk) >= CHUNK_LINES:
            yield ("rows", file_index, first, chunk)
            chunk, size, first = [], 0, count + 1
    if chunk:
        yield ("rows", file_index, first, chunk)


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
        self.id_range: dict[str, list[int] | None] = {k: None for k in keys}
        self.skipped: dict[str, dict] = {}

    def add_ids(self, key, low: int, high: int):
        known = self.id_range[key]
        self.id_range[key] = [low, high] if known is None else [min(known[0], low), max(known[1], high)]

    def skip(self, reason, path, line, key):
        entry = self.skipped.setdefault(reason, {"count": 0, "first": []})
        entry["count"] += 1
        if len(entry["first"]) < MAX_FIRST_POSITIONS:
            pos = {"file": path, "line": line}
            if key is not None:
                pos["key"] = key
            entry["first"].append(pos)

    def to_json(self):
        return {"lines": self.lines, "documents": self.documents, "tokens": self.tokens, "skipped": self.skipped,
                "id_range": self.id_range}

    def add_json(self, d):
        self.lines += d["lines"]
        for k in self.documents:
            self.documents[k] += d["documents"][k]
            self.tokens[k] += d["tokens"][k]
            if d["id_range"][k] is not None:
                self.add_ids(k, *d["id_range"][k])
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


@contextlib.contextmanager
def _signals_deferred():
    """Starting the worker pool must not be cut half-way: a spawned child whose parent stops while sending
    it its start-up data dies with a traceback. SIGINT/SIGTERM that arrive meanwhile are re-raised after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {sig: signal.signal(sig, lambda number, _frame: pending.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for number in pending:
            signal.raise_signal(number)


def _run_partition(tasks, names: list[str], prefixes, fmt: DocumentFormat, workers, strict, stats, bar):
    """Tokenise `tasks` into builders at prefixes[key] = (bin path, idx path); `names` are the inputs'
    names for skip positions."""
    keys = list(fmt.keys)
    writers = {k: IndexedDatasetWriter(prefixes[k][0], fmt.dtype) for k in keys}
    pool = None
    try:
        if workers > 1:
            import multiprocessing as mp

            with _signals_deferred():
                pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(fmt,))
            results = ordered_imap(pool, _process_task, tasks, window=4 * workers)
        else:
            _init_worker(fmt)
            results = map(_process_task, tasks)
        for n_lines, per_key, skipped in results:
            stats.lines += n_lines
            for reason, fi, line, key in skipped:
                if strict and reason not in NON_FATAL_REASONS:
                    where = f"{names[fi]}:{line}" if line else names[fi]
                    what = f" (key {key!r})" if key else ""
                    raise PreprocessError(
                        f"{where}: {reason.replace('_', ' ')}{what}; --strict makes malformed input fatal. "
                        f"Fix the input or drop --strict to skip and count such lines."
                    )
                stats.skip(reason, names[fi], line, key)
            docs_here = 0
            for k, (tokens, lengths) in per_key.items():
                writers[k].add_documents(tokens, lengths)
                off = len(tokens)
                stats.documents[k] += len(lengths)
                stats.tokens[k] += off
                if off:
                    stats.add_ids(k, int(tokens.min()), int(tokens.max()))
                docs_here = max(docs_here, len(lengths))
            if bar is not None:
                bar.tokens_total = getattr(bar, "tokens_total", 0) + sum(int(v[1].sum()) for v in per_key.values())
                el = max(time.time() - bar.start_t, 1e-9)
                bar.set_postfix_str(f"{bar.tokens_total / el:,.0f} tok/s", refresh=False)
                bar.update(docs_here)
        for k in keys:
            writers[k].finalize(prefixes[k][1])
    except BaseException:
        for k in keys:
            writers[k].close()
            _remove(*prefixes[k])
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _document_format(tokenizer_model, keys, append_eod, dtype, max_document_bytes, vocab_size, eod_id,
                     pretokenized: bool, output_prefix: str) -> tuple[DocumentFormat, dict]:
    """-> (the workers' DocumentFormat, the summary's "tokenizer" section)."""
    if max_document_bytes < 1:
        raise PreprocessError(f"--max-document-bytes must be positive, got {max_document_bytes}")
    if tokenizer_model is not None:
        from .tokenizer import SentencePieceTokenizer

        tok = SentencePieceTokenizer(tokenizer_model)
        if vocab_size is not None and not pretokenized and vocab_size != tok.vocab_size:
            raise PreprocessError(f"--vocab-size {vocab_size} disagrees with the tokenizer's {tok.vocab_size}; "
                                  "--vocab-size is for pre-tokenized input (--input-ids-key)")
        if vocab_size is not None and vocab_size > tok.vocab_size:  # the summary would vouch for ids it cannot make
            raise PreprocessError(f"--vocab-size {vocab_size} exceeds the {tok.vocab_size} pieces of "
                                  f"{tokenizer_model}: that tokenizer cannot have made such ids. Give the tokenizer "
                                  "that made them, or drop --tokenizer-model (the summary then vouches for none)")
        vocab = vocab_size or tok.vocab_size
        eod = tok.eod if eod_id is None else eod_id
        made_with = {"model": os.path.abspath(tokenizer_model), "sha256": tok.sha256, "vocab_size": vocab, "eod": eod}
    elif not pretokenized:
        raise PreprocessError("--tokenizer-model is required to tokenise text (pre-tokenized ids: --input-ids-key)")
    elif vocab_size is None:
        raise PreprocessError("pre-tokenized input needs --vocab-size (or --tokenizer-model) to check the ids against")
    else:
        vocab, eod = vocab_size, eod_id
        made_with = {"model": None, "sha256": None, "vocab_size": vocab, "eod": eod}
    if vocab < 1:
        raise PreprocessError(f"--vocab-size must be positive, got {vocab}")
    if append_eod and eod is None:
        raise PreprocessError("--append-eod needs the end-of-document id: pass --eod-id (or --tokenizer-model)")
    if eod is not None and not 0 <= eod < vocab:
        raise PreprocessError(f"--eod-id {eod} is outside the vocabulary 0..{vocab - 1}")
    np_dtype = dtype_for_vocab(vocab) if dtype == "auto" else {"uint16": np.uint16, "int32": np.int32}[dtype]
    check_dtype_fits(np_dtype, vocab, output_prefix + f"_{keys[0]}_document.bin")
    model = os.path.abspath(tokenizer_model) if tokenizer_model is not None and not pretokenized else None
    fmt = DocumentFormat(tuple(keys), model, bool(append_eod), eod, np.dtype(np_dtype).name, int(max_document_bytes),
                         int(vocab))
    return fmt, made_with


def _check_replaceable(final: str) -> None:
    """An existing FINAL.bin/.idx is replaced only when its summary says this tool wrote it."""
    if not (os.path.exists(final + ".bin") or os.path.exists(final + ".idx")):
        return
    try:
        with open(final + ".summary.json") as f:
            ours = "lines_read" in json.load(f)
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise PreprocessError(f"{final}.bin/.idx exist and were not written by preprocess_data.py; choose another "
                              "--output-prefix or pass --force to replace them")


def preprocess(
    inputs: list[str] | str | None,
    output_prefix: str,
    tokenizer_model: str | None,
    json_keys: list[str] | tuple = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    partitions: int = 1,
    strict: bool = False,
    dtype: str = "auto",
    progress: bool = True,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
    hf_dataset: str | None = None,
    hf_split: str = "train",
    hf_streaming: bool = False,
    input_ids_key: str | None = None,
    vocab_size: int | None = None,
    eod_id: int | None = None,
    allow_empty: bool = False,
    force: bool = False,
) -> dict:
    """Tokenise `inputs` (files, directories, globs) or the `hf_split` split of `hf_dataset` into
    ``OUT_<key>_document.bin/.idx``; write and return the summary(ies).

    `input_ids_key`: the records hold pre-tokenized id lists under that key (no tokenizer needed; ids are
    checked against `vocab_size`, or the tokenizer's). Returns {key: summary dict}; each summary is also
    written to ``OUT_<key>_document.summary.json``. Raises PreprocessError when nothing would be written,
    unless `allow_empty`, and when OUT_<key>_document.bin/.idx exist without a summary of this tool, unless
    `force`.
    """
    if (inputs is None) == (hf_dataset is None):
        raise PreprocessError("give either --input files or --hf-dataset, not both or neither")
    keys = [input_ids_key] if input_ids_key else list(json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys must name distinct keys, got {keys}")
    if workers < 1 or partitions < 1:
        raise PreprocessError("--workers and --partitions must be >= 1")
    fmt, made_with = _document_format(tokenizer_model, keys, append_eod, dtype, max_document_bytes, vocab_size,
                                      eod_id, bool(input_ids_key), output_prefix)
    ignored: list[str] = []
    if hf_dataset is not None:
        if partitions > 1:
            raise PreprocessError("--partitions splits input files; a --hf-dataset is read as one stream "
                                  "(use --workers to parallelise)")
        from .hf_source import HFSourceError, iter_rows, open_dataset

        try:
            dataset = open_dataset(hf_dataset, hf_split, hf_streaming, keys)
        except HFSourceError as err:
            raise PreprocessError(str(err)) from None
        files = [f"{hf_dataset}[{hf_split}]"]
        groups = [[0]]
    else:
        files = expand_inputs(inputs, ignored)
        groups = _partition_files(files, partitions)

    def tasks_for(idx):
        if hf_dataset is not None:
            return iter_row_tasks(iter_rows(dataset, keys), keys, 0, chunk_bytes, max_document_bytes)
        return iter_tasks([files[i] for i in idx], idx[0] if idx else 0, chunk_bytes, max_document_bytes)

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    finals = {k: output_name(output_prefix, k) for k in keys}
    if not force:
        for final in finals.values():
            _check_replaceable(final)
    t0 = time.time()
    options = dict(asdict(fmt), tokenizer_sha256=made_with["sha256"])
    stats = _Stats(keys)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" docs", desc=f"tokenising {files[0] if hf_dataset else f'{len(files)} file(s)'}",
                   mininterval=1.0, dynamic_ncols=True)
    tmp = {k: (finals[k] + ".bin.tmp", finals[k] + ".idx.tmp") for k in keys}
    try:
        if len(groups) == 1:
            _run_partition(tasks_for(groups[0]), files, tmp, fmt, workers, strict, stats, bar)
            reused = 0
        else:
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
                _run_partition(tasks_for(idx), files, ptmp, fmt, workers, strict, part_stats, bar)
                for k in keys:
                    os.replace(ptmp[k][0], pp[k] + ".bin")
                    os.replace(ptmp[k][1], pp[k] + ".idx")
                with open(done + ".tmp", "w") as f:
                    json.dump({"fingerprint": fp, "files": [files[i] for i in idx], "stats": part_stats.to_json()}, f)
                os.replace(done + ".tmp", done)
                stats.add_json(part_stats.to_json())
            for k in keys:
                writer = IndexedDatasetWriter(tmp[k][0], fmt.dtype)
                try:
                    for pp in part_prefixes:
                        writer.add_index(pp[k])
                    writer.finalize(tmp[k][1])
                except BaseException:
                    writer.close()
                    _remove(*tmp[k])
                    raise
        empty = [k for k in keys if stats.documents[k] == 0]
        if empty and not allow_empty:
            reasons = ", ".join(f"{e['count']} {r}" for r, e in stats.skipped.items()) or "none"
            raise PreprocessError(
                f"no document was written for {'key' if len(empty) == 1 else 'keys'} {', '.join(map(repr, empty))}: "
                f"{stats.lines} record(s) read, skipped: {reasons}. Check --json-keys/--input-ids-key and the input, "
                "or pass --allow-empty to write an empty dataset")
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
            "pretokenized": bool(input_ids_key),
            "documents": stats.documents[k],
            "tokens": stats.tokens[k],
            "id_range": stats.id_range[k],
            "lines_read": stats.lines,
            "skipped": stats.skipped,
            "skipped_total": sum(e["count"] for e in stats.skipped.values()),
            "seconds": round(seconds, 3),
            "docs_per_s": round(stats.documents[k] / max(seconds, 1e-9), 1),
            "tokens_per_s": round(stats.tokens[k] / max(seconds, 1e-9), 1),
            "workers": workers,
            "partitions": len(groups),
            "partitions_reused": reused,
            "dtype": fmt.dtype,
            "append_eod": bool(append_eod),
            "max_document_bytes": fmt.max_document_bytes,
            "tokenizer": made_with,
            "inputs": files,
            "ignored_inputs": ignored,
            "hf_dataset": {"name": hf_dataset, "split": hf_split, "streaming": bool(hf_streaming)}
            if hf_dataset is not None else None,
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
