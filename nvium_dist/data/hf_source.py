"""Hugging Face `datasets` as a preprocessing source: rows in dataset order, in chunks of column values.

`--hf-dataset` accepts a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`,
parquet or arrow files (paths, globs or a directory holding them), or the name of a dataset already in
the local Hugging Face cache. Nothing is downloaded: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set before
`datasets` is imported. `streaming=True` iterates parquet/arrow/cached datasets without building an arrow
cache copy first (for corpora larger than the disk cache); a save_to_disk directory is memory-mapped and
always read in place.
"""
from __future__ import annotations

import glob
import os
from typing import Iterator

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


class HFSourceError(ValueError):
    """The dataset cannot be opened or lacks the requested split/columns."""


def _data_files(name: str) -> list[str]:
    """Parquet/arrow files named by a path, a glob or a directory (recursively); [] when there are none."""
    if os.path.isdir(name):
        found = [os.path.join(d, f) for d, _, fs in os.walk(name) for f in fs]
    else:
        found = glob.glob(name, recursive=True) if any(c in name for c in "*?[") else [name]
    return sorted(f for f in found if os.path.isfile(f) and f.endswith(tuple(FILE_BUILDERS)))


def open_dataset(name: str, split: str, streaming: bool, columns: list[str]):
    """The `split` of dataset `name` with only `columns`, as a Dataset or IterableDataset."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    try:
        if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f))
                                       for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            dataset = datasets.load_from_disk(name)
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise HFSourceError(f"{name} has splits {sorted(dataset)}, not {split!r}; pass --hf-split")
                dataset = dataset[split]
            elif dataset.split is not None and str(dataset.split) != split:
                raise HFSourceError(f"{name} holds the {dataset.split!r} split, not {split!r}; pass --hf-split")
        else:
            files = _data_files(name)
            if files:
                kinds = {FILE_BUILDERS[os.path.splitext(f)[1]] for f in files}
                if len(kinds) > 1:
                    raise HFSourceError(f"{name} mixes parquet and arrow files; pass one kind")
                dataset = datasets.load_dataset(kinds.pop(), data_files={split: files}, split=split,
                                                streaming=streaming)
            elif os.path.exists(name):
                raise HFSourceError(f"{name} is neither a save_to_disk directory nor parquet/arrow files")
            else:
                dataset = datasets.load_dataset(name, split=split, streaming=streaming)
    except HFSourceError:
        raise
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, OSError) as err:
        raise HFSourceError(f"cannot open dataset {name!r} split {split!r} offline: {err}. Pass a save_to_disk "
                            "directory, parquet/arrow files, or a dataset already in the local cache") from None
    present = list(dataset.column_names) if dataset.column_names is not None else None
    missing = [c for c in columns if present is not None and c not in present]
    if missing:
        raise HFSourceError(f"dataset {name!r} split {split!r} has no column {missing[0]!r} (columns: {present})")
    return dataset.select_columns(columns)


def iter_rows(dataset, columns: list[str], batch_rows: int = 64) -> Iterator[dict]:
    """Rows {column: value} in dataset order, read `batch_rows` at a time."""
    for batch in dataset.iter(batch_size=batch_rows):
        for i in range(len(batch[columns[0]])):
            yield {c: batch[c][i] for c in columns}
