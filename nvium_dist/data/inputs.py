"""Input discovery and streaming readers shared by the corpus tools (no torch imports).

Inputs are files, directories (searched recursively) or globs. Kinds, by file name:
    *.jsonl, *.json, *.ndjson (+ .gz)      -> JSON lines, one document per line
    anything else (e.g. *.txt, *.md, *.txt.gz) -> plain text, one document per file
A file named on the command line or matched by a glob is always read; inside a directory only corpus files
are (JSON lines and *.txt, *.text, *.md, *.rst, plain or .gz): a tokenizer .model, a parquet file or a
README next to the corpus is listed as ignored instead of becoming a document.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Iterator

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson", ".ndjson.gz")
TEXT_SUFFIXES = tuple(s + gz for s in (".txt", ".text", ".md", ".rst") for gz in ("", ".gz"))


def input_kind(path: str) -> str:
    return "jsonl" if path.lower().endswith(JSONL_SUFFIXES) else "text"


def is_corpus_file(path: str) -> bool:
    return path.lower().endswith(JSONL_SUFFIXES + TEXT_SUFFIXES)


def expand_inputs(patterns: list[str] | str, ignored: list[str] | None = None) -> list[str]:
    """Files named by paths, directories or globs; each pattern's matches sorted, duplicates removed.
    Files inside directories that are not corpus files are skipped and appended to `ignored`.

    Raises FileNotFoundError naming the pattern when one matches nothing.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        for part in [p for p in pattern.split(",") if p] if "," in pattern and not os.path.exists(pattern) else [pattern]:
            if os.path.isdir(part):
                found = sorted(os.path.join(d, f) for d, _, fs in os.walk(part) for f in fs if not f.startswith("."))
                matches = [f for f in found if is_corpus_file(f)]
                if ignored is not None:
                    ignored.extend(f for f in found if not is_corpus_file(f))
            elif os.path.isfile(part):
                matches = [part]
            else:
                matches = sorted(p for p in glob.glob(part, recursive=True) if os.path.isfile(p))
            if not matches:
                what = ("no corpus file (.jsonl/.json/.ndjson/.txt/.md, plain or .gz)" if os.path.isdir(part)
                        else "no file")
                raise FileNotFoundError(
                    f"input {part!r} matches {what}; pass existing files, directories or quoted globs "
                    f"(e.g. --input 'data/*.jsonl.gz')"
                )
            for m in matches:
                key = os.path.abspath(m)
                if key not in seen:
                    seen.add(key)
                    out.append(m)
    return out


def open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=1 << 20)


def read_text_file(path: str, max_bytes: int | None = None) -> str | None:
    """The file's text (invalid UTF-8 replaced); None when it is longer than `max_bytes` (read no further)."""
    with open_binary(path) as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        return None
    return data.decode("utf-8", errors="replace")


def iter_texts(paths: list[str], json_key: str = "text") -> Iterator[str]:
    """Stream document texts (JSONL lines with a string ``json_key``; whole text files); bad lines are skipped."""
    for path in paths:
        if input_kind(path) == "text":
            text = read_text_file(path)
            if text.strip():
                yield text
            continue
        with open_binary(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    value = json.loads(line).get(json_key)
                except (ValueError, AttributeError):
                    continue
                if isinstance(value, str) and value.strip():
                    yield value
