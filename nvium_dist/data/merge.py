"""Concatenate several Megatron datasets into one (IndexedDatasetWriter.add_index: megatron-core's format,
without importing megatron-core)."""

from __future__ import annotations

import json
import os
import time

from .indexed import DatasetFormatError, IndexedDatasetWriter, normalize_prefix, validate_indexed_files


def merge_datasets(prefixes: list[str], output_prefix: str) -> dict:
    """Merge ``prefixes`` (in order) into ``output_prefix``.bin/.idx; documents keep their order.

    All inputs are validated first and must share a token dtype. The output is written under
    ``.tmp`` names and renamed when complete; a ``.summary.json`` is written next to it.
    """
    if not prefixes:
        raise ValueError("no datasets to merge")
    prefixes = [normalize_prefix(p) for p in prefixes]
    output_prefix = normalize_prefix(output_prefix)
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise ValueError(f"output prefix {output_prefix!r} is also an input; choose a new --output-prefix")
    infos = [validate_indexed_files(p) for p in prefixes]
    dtypes = {info["dtype"] for info in infos}
    if len(dtypes) != 1:
        listing = ", ".join(f"{i['prefix']}: {i['dtype'].__name__}" for i in infos)
        raise DatasetFormatError(
            f"cannot merge datasets with different token dtypes ({listing}); they were made with tokenizers "
            f"of different vocabulary sizes. Fix: re-run tools/preprocess_data.py on all inputs with one tokenizer."
        )
    tokenizers = set()
    for p in prefixes:
        try:
            with open(p + ".summary.json") as f:
                tokenizers.add(json.load(f)["tokenizer"]["sha256"])
        except (OSError, KeyError, ValueError):
            tokenizers.add(None)
    if len(tokenizers - {None}) > 1:
        raise DatasetFormatError(
            f"the inputs were tokenised with different tokenizers (summary .json files show "
            f"{len(tokenizers - {None})} model hashes); merging them would mix incompatible ids. "
            f"Fix: re-run tools/preprocess_data.py on all inputs with one --tokenizer-model."
        )
    t0 = time.time()
    dtype = dtypes.pop()
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_bin, tmp_idx = output_prefix + ".bin.tmp", output_prefix + ".idx.tmp"
    writer = IndexedDatasetWriter(tmp_bin, dtype)
    try:
        for p in prefixes:
            writer.add_index(p)
        writer.finalize(tmp_idx)
    except BaseException:
        writer.close()
        for x in (tmp_bin, tmp_idx):
            if os.path.exists(x):
                os.remove(x)
        raise
    os.replace(tmp_bin, output_prefix + ".bin")
    os.replace(tmp_idx, output_prefix + ".idx")
    out = validate_indexed_files(output_prefix)
    summary = {
        "output_prefix": output_prefix,
        "inputs": [{"prefix": i["prefix"], "documents": i["documents"], "tokens": i["tokens"]} for i in infos],
        "documents": out["documents"],
        "tokens": out["tokens"],
        "dtype": dtype.__name__,
        "seconds": round(time.time() - t0, 3),
    }
    sha = tokenizers - {None}
    if len(sha) == 1 and None not in tokenizers:
        with open(prefixes[0] + ".summary.json") as f:
            summary["tokenizer"] = json.load(f)["tokenizer"]
    with open(output_prefix + ".summary.json.tmp", "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(output_prefix + ".summary.json.tmp", output_prefix + ".summary.json")
    return summary
