"""Validated access to Megatron ``.bin/.idx`` datasets.

megatron-core's IndexedDataset trusts its files: a truncated .idx gives a numpy buffer error,
a truncated .bin gives garbage or a crash deep inside training. ``open_indexed_dataset`` checks
the header, the sizes and the index invariants first and raises ``DatasetFormatError`` naming
the file and the fix. Only numpy is imported at module level; megatron-core on first open.

.idx layout (megatron-core, version 1):
    9 bytes  magic b"MMIDIDX\\x00\\x00"
    8 bytes  version (uint64 little endian, == 1)
    1 byte   dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    8 bytes  sequence count S
    8 bytes  document count D (= number of documents + 1)
    S int32 sequence lengths, S int64 byte pointers into .bin, D int64 document indices
"""

from __future__ import annotations

import os
import struct

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


class DatasetFormatError(ValueError):
    """A .bin/.idx pair is missing, truncated, corrupt or does not fit the tokenizer."""


def normalize_prefix(prefix: str) -> str:
    """Accept ``X``, ``X.bin`` or ``X.idx`` and return the prefix ``X``."""
    prefix = os.fspath(prefix)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            return prefix[: -len(ext)]
    return prefix


def dtype_for_vocab(vocab_size: int):
    """megatron-core's rule (DType.optimal_dtype): uint16 when vocab < 65500, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_max_vocab(dtype) -> int:
    return int(np.iinfo(dtype).max) + 1


def check_dtype_fits(dtype, vocab_size: int, path: str) -> None:
    dtype = np.dtype(dtype).type
    if not np.issubdtype(dtype, np.integer) or vocab_size > dtype_max_vocab(dtype):
        raise DatasetFormatError(
            f"{path}: token dtype {np.dtype(dtype).name} cannot hold the ids of a {vocab_size}-token vocabulary "
            f"(max id {vocab_size - 1}). Fix: re-run tools/preprocess_data.py with this tokenizer (it picks "
            f"uint16 below 65500 tokens and int32 above; do not force --dtype uint16 for large vocabularies)."
        )


def read_index_header(idx_path: str) -> dict:
    """Parse and size-check an .idx file; raise DatasetFormatError on any inconsistency."""
    fix = "re-run tools/preprocess_data.py (or merge_datasets.py) to rebuild it"
    size = os.path.getsize(idx_path)
    if size < HEADER_BYTES:
        raise DatasetFormatError(f"{idx_path}: truncated index ({size} bytes, header alone is {HEADER_BYTES}); {fix}")
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:9] != INDEX_MAGIC:
        raise DatasetFormatError(
            f"{idx_path}: not a Megatron index (magic {head[:9]!r}, expected {INDEX_MAGIC!r}); {fix}"
        )
    (version,) = struct.unpack("<Q", head[9:17])
    if version != 1:
        raise DatasetFormatError(f"{idx_path}: index version {version}, only version 1 is supported; {fix}")
    code = head[17]
    if code not in DTYPE_CODES:
        raise DatasetFormatError(f"{idx_path}: unknown token dtype code {code}; the file is corrupt; {fix}")
    seq_count, doc_count = struct.unpack("<QQ", head[18:34])
    expected = HEADER_BYTES + seq_count * (4 + 8) + doc_count * 8
    if size != expected and size != expected + seq_count:  # + S int8 modes for multimodal datasets
        raise DatasetFormatError(
            f"{idx_path}: index size {size} bytes does not match its header ({seq_count} sequences, "
            f"{doc_count} document boundaries -> {expected} bytes); it is truncated or corrupt; {fix}"
        )
    return {"dtype": DTYPE_CODES[code], "dtype_code": code, "sequence_count": seq_count,
            "document_count": doc_count, "multimodal": size != expected}


def validate_indexed_files(prefix: str, vocab_size: int | None = None) -> dict:
    """Check a .bin/.idx pair without megatron; return header info plus counts."""
    prefix = normalize_prefix(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        raise DatasetFormatError(
            f"{' and '.join(missing)} not found (dataset prefix {prefix!r}). Fix: pass the prefix without "
            f"extension, e.g. OUT_text_document for OUT_text_document.bin/.idx, as written by "
            f"tools/preprocess_data.py --output-prefix OUT"
        )
    info = read_index_header(idx_path)
    fix = "re-run tools/preprocess_data.py (or merge_datasets.py) to rebuild it"
    s, d = info["sequence_count"], info["document_count"]
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    try:
        lengths = np.frombuffer(mm, dtype=np.int32, count=s, offset=HEADER_BYTES)
        pointers = np.frombuffer(mm, dtype=np.int64, count=s, offset=HEADER_BYTES + 4 * s)
        docs = np.frombuffer(mm, dtype=np.int64, count=d, offset=HEADER_BYTES + 12 * s)
        itemsize = np.dtype(info["dtype"]).itemsize
        if d < 1 or docs[0] != 0 or docs[-1] != s or (d > 1 and np.any(np.diff(docs) < 0)):
            raise DatasetFormatError(
                f"{idx_path}: document indices are inconsistent (must start at 0, be non-decreasing and end "
                f"at the sequence count {s}); the index is corrupt; {fix}"
            )
        if s and (np.any(lengths < 0) or pointers[0] != 0 or
                  np.any(np.diff(pointers) != lengths[:-1].astype(np.int64) * itemsize)):
            raise DatasetFormatError(f"{idx_path}: sequence pointers do not match sequence lengths; corrupt; {fix}")
        tokens = int(lengths.sum(dtype=np.int64))
        bin_expected = tokens * itemsize
        bin_size = os.path.getsize(bin_path)
        if bin_size != bin_expected:
            raise DatasetFormatError(
                f"{bin_path}: data file has {bin_size} bytes but its index {idx_path} describes {tokens} tokens "
                f"of {np.dtype(info['dtype']).name} = {bin_expected} bytes; the .bin is "
                f"{'truncated' if bin_size < bin_expected else 'longer than indexed (stale or mismatched index)'}; {fix}"
            )
    finally:
        del mm
    if vocab_size is not None:
        check_dtype_fits(info["dtype"], int(vocab_size), bin_path)
    info.update(prefix=prefix, documents=d - 1, sequences=s, tokens=tokens)
    return info


def check_dataset_usable(prefix: str, vocab_size: int, scan_ids: bool = True, known_max_id: int | None = None) -> dict:
    """`validate_indexed_files`, plus: the dataset holds tokens, and (`scan_ids`) every token id is below
    `vocab_size` (a chunked max over the .bin; ids at or above it would index past the embedding), its
    "max_id" in the result. `known_max_id`: the highest id an earlier scan of the same file found; the scan
    runs only if it does not fit (to name the first bad position)."""
    info = validate_indexed_files(prefix, vocab_size)
    bin_path = info["prefix"] + ".bin"
    if info["tokens"] == 0:
        raise DatasetFormatError(f"{bin_path}: the dataset is empty ({info['documents']} documents, 0 tokens). "
                                 "Fix: preprocess a corpus that has text, or drop this prefix from the blend")
    if known_max_id is not None and known_max_id < vocab_size:
        return dict(info, max_id=known_max_id)
    if scan_ids:
        ids = np.memmap(bin_path, mode="r", dtype=info["dtype"])
        chunk = 1 << 26
        info["max_id"] = 0
        for start in range(0, len(ids), chunk):
            highest = int(ids[start:start + chunk].max())
            if highest >= vocab_size:
                position = start + int(np.argmax(ids[start:start + chunk] >= vocab_size))
                raise DatasetFormatError(
                    f"{bin_path}: token id {highest} (first out-of-range id at token {position}) is outside the "
                    f"vocabulary of {vocab_size}; the data was made with another tokenizer or is corrupt. Fix: "
                    "re-run tools/preprocess_data.py with the model's tokenizer")
            info["max_id"] = max(info["max_id"], highest)
        del ids
    return info


def open_indexed_dataset(prefix: str, vocab_size: int | None = None, mmap: bool = True):
    """Validate, then open a megatron-core ``IndexedDataset`` at ``prefix`` (``X`` for ``X.bin/.idx``).

    ``vocab_size`` (optional) also checks that the token dtype can hold the tokenizer's ids.
    Raises DatasetFormatError (a ValueError) naming the file and the fix.
    """
    info = validate_indexed_files(prefix, vocab_size)
    if info["sequences"] == 0:  # megatron's reader cannot map an empty .bin
        raise DatasetFormatError(f"{info['prefix']}.bin: the dataset is empty (0 documents, 0 tokens); "
                                 "preprocess a corpus that has text")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(normalize_prefix(prefix), multimodal=False, mmap=mmap)


class IndexedDatasetWriter:
    """Writes a .bin/.idx pair byte for byte as megatron-core's IndexedDatasetBuilder does (tested), with
    numpy alone: importing megatron-core costs seconds per process, and the builder's per-document calls
    dominate the writing; here a batch of documents is one write.

        writer = IndexedDatasetWriter("out.bin.tmp", np.uint16)
        writer.add_documents(tokens, lengths)   # flat tokens, one length per document (one sequence each)
        writer.add_index("other_prefix")        # appends a whole dataset of the same dtype
        writer.finalize("out.idx.tmp")
    """

    def __init__(self, bin_path: str, dtype):
        self.dtype = np.dtype(dtype)
        self._code = next(code for code, t in DTYPE_CODES.items() if np.dtype(t) == self.dtype)
        self.data_file = open(bin_path, "wb")
        self._sequence_lengths: list[np.ndarray] = []
        self._document_indices: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self._sequences = 0

    def _append(self, lengths: np.ndarray, document_ends: np.ndarray) -> None:
        self._sequence_lengths.append(lengths.astype(np.int32))
        self._document_indices.append(self._sequences + document_ends.astype(np.int64))
        self._sequences += len(lengths)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents of `lengths` tokens each, concatenated in `tokens`."""
        self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._append(np.asarray(lengths), np.arange(1, len(lengths) + 1))

    def add_index(self, prefix: str) -> None:
        """Appends the dataset at `prefix` (validated first; same dtype)."""
        import shutil

        header = read_index_header(prefix + ".idx")
        if np.dtype(header["dtype"]) != self.dtype:
            raise DatasetFormatError(f"{prefix}.idx: token dtype {np.dtype(header['dtype']).name}, expected "
                                     f"{self.dtype.name}")
        count, documents = header["sequence_count"], header["document_count"]
        with open(prefix + ".idx", "rb") as f:
            f.seek(HEADER_BYTES)
            lengths = np.fromfile(f, dtype=np.int32, count=count)
            f.seek(8 * count, os.SEEK_CUR)  # the pointers are recomputed
            document_indices = np.fromfile(f, dtype=np.int64, count=documents)
        self._append(lengths, document_indices[1:])
        with open(prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self.data_file)

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        lengths = np.concatenate(self._sequence_lengths) if self._sequence_lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        document_indices = np.concatenate(self._document_indices)
        with open(idx_path, "wb") as f:
            f.write(INDEX_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", self._code))
            f.write(struct.pack("<QQ", len(lengths), len(document_indices)))
            for array in (lengths, pointers, document_indices):
                f.write(array.tobytes(order="C"))

    def close(self) -> None:
        """Abandons an unfinished dataset (the caller removes its files)."""
        self.data_file.close()
