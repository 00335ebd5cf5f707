"""Concatenate several Megatron datasets into one (IndexedDatasetWriter.add_index: megatron-core's format,
without importing megatron-core)."""

from __future__ import annotations

import json
import os
import time

from .indexed import DatasetFormatError, IndexedDatasetWriter, normalize_prefix, validate_indexed_files


def merge_datasets(prefixes: list[str], output_prefix: str, allow_unverified: bool = False) -> dict:
    """Merge ``prefixes`` (in order) into ``output_prefix``.bin/.idx; documents keep their order.

    All inputs are validated first and must share a token dtype and the tokenizer their summaries record; an
    input whose summary records none is refused unless `allow_unverified` (the merged summary then records no
    tokenizer, so training checks the ids). The output is written under ``.tmp`` names and renamed when
    complete; a ``.summary.json`` (with the inputs' tokenizer) is written next to it.
    """
    from .gpt_data import recorded_tokenizer

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
    made_with = {p: recorded_tokenizer(p) for p in prefixes}
    hashes = {p: made.get("sha256") for p, made in made_with.items()}
    if len(set(hashes.values()) - {None}) > 1:
        listing = ", ".join(f"{p}: {made_with[p].get('model')} (sha256 {h[:12]})" for p, h in hashes.items() if h)
        raise DatasetFormatError(
            f"the inputs were tokenised with different tokenizers ({listing}); merging them would mix incompatible "
            f"ids. Fix: re-run tools/preprocess_data.py on all inputs with one --tokenizer-model.")
    unverified = [p for p, h in hashes.items() if h is None]
    if unverified and not allow_unverified:
        raise DatasetFormatError(
            f"no summary names the tokenizer of {', '.join(unverified[:3])} (a .summary.json of "
            f"tools/preprocess_data.py with --tokenizer-model), so nothing shows it matches the other inputs. Fix: "
            f"re-run tools/preprocess_data.py on it, or pass --allow-unverified (the merged summary then vouches for "
            f"no tokenizer and training checks every id)")
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
    if unverified:
        summary["unverified_inputs"] = unverified
    else:
        summary["tokenizer"] = made_with[prefixes[0]]
    with open(output_prefix + ".summary.json.tmp", "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(output_prefix + ".summary.json.tmp", output_prefix + ".summary.json")
    return summary
