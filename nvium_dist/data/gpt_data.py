"""Training-side data: megatron-core GPTDataset / BlendedDataset via BlendedMegatronDatasetBuilder.

    train, valid, test = build_gpt_datasets(["0.3", "A_text_document", "0.7", "B_text_document"],
                                            "969,30,1", seq_length=1024, seed=1234,
                                            num_samples=(train_samples, valid_samples, test_samples),
                                            tokenizer=SentencePieceTokenizer("tok.model"))
    for batch in batch_iterator(train, micro_batch_size=4, dp_rank=r, dp_size=dp,
                                consumed_samples=resume_point):
        batch["tokens"], batch["labels"], batch["loss_mask"]   # [b, s] each

* The global sample order is fixed by (blend, split, seq_length, seed, num_samples): megatron
  shuffles documents and samples with numpy RandomState(seed) and blends with its C++ helper.
  Resuming is therefore only a matter of starting the iterator at ``consumed_samples``.
* Works with and without torch.distributed. With it, every rank of the world must call
  ``build_gpt_datasets`` (megatron builds on rank 0 first, barrier, then the others load the
  cached indices). Without it and with ``cache_dir`` set, a private single-process gloo group
  (in-memory HashStore, no network) is opened for the build and closed afterwards, because
  megatron-core 0.16.1's BlendedDataset calls ``torch.distributed.get_rank()`` on a cache miss.
* megatron's C++ ``helpers`` are compiled on first use if the wheel did not ship them
  (``make`` in megatron/core/datasets, g++ + pybind11), on rank 0 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterator, Optional

from .indexed import DatasetFormatError, check_dataset_usable, normalize_prefix, validate_indexed_files
from .tokenizer import SentencePieceTokenizer, check_vocab_fits  # noqa: F401  (re-exported)


def parse_blend(blend: list[str]) -> tuple[list[str], Optional[list[float]]]:
    """``["0.3", "A", "0.7", "B"]`` -> (["A", "B"], [0.3, 0.7]); ``["A", "B"]`` -> (["A", "B"], None)."""
    if isinstance(blend, str):
        blend = blend.split()
    blend = [str(x) for x in blend]
    if not blend:
        raise ValueError("empty data blend; pass e.g. ['DATA_text_document'] or ['0.3', 'A', '0.7', 'B']")

    def as_float(s):
        try:
            return float(s)
        except ValueError:
            return None

    floats = [as_float(x) for x in blend]
    if len(blend) % 2 == 0 and all(f is not None for f in floats[0::2]) and all(f is None for f in floats[1::2]):
        weights = floats[0::2]
        prefixes = blend[1::2]
        if any(w <= 0 for w in weights):
            raise ValueError(f"blend weights must be > 0, got {weights} in {blend}")
        return [normalize_prefix(p) for p in prefixes], weights
    if any(f is not None for f in floats):
        raise ValueError(
            f"cannot parse data blend {blend}: use a list of prefixes ['A', 'B'] or alternating "
            f"weight/prefix pairs ['0.3', 'A', '0.7', 'B']"
        )
    return [normalize_prefix(p) for p in blend], None


def recorded_tokenizer(prefix: str) -> dict:
    """The tokenizer `prefix.summary.json` says the data was made with ({} when there is no readable record)."""
    path = normalize_prefix(prefix) + ".summary.json"
    try:
        with open(path) as f:
            made_with = json.load(f).get("tokenizer") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return made_with if isinstance(made_with, dict) else {}


def check_dataset_tokenizer(prefix: str, tokenizer, scan_records: dict | None = None) -> dict:
    """Validate files, that the data is not empty and, when ``prefix.summary.json`` exists, that it was made
    with this tokenizer. Without such a record every token id is checked to be inside the vocabulary; with
    `scan_records` ({absolute .bin path: {"size", "mtime_ns", "max_id"}}) a scan of the same unchanged file is
    reused, and a new scan is added to it. -> {"vouched": the summary names this tokenizer, "max_id": ...}."""
    made_with = recorded_tokenizer(prefix)
    sha = made_with.get("sha256")
    ours = getattr(tokenizer, "sha256", None)
    if sha and ours and sha != ours:
        raise DatasetFormatError(
            f"{normalize_prefix(prefix)}.bin was tokenised with {made_with.get('model')} (vocab "
            f"{made_with.get('vocab_size')}, sha256 {sha[:12]}) but training uses {tokenizer.model_path} "
            f"(vocab {tokenizer.vocab_size}, sha256 {tokenizer.sha256[:12]}). Fix: train with the tokenizer the "
            f"data was made with, or re-run tools/preprocess_data.py with --tokenizer-model {tokenizer.model_path}."
        )
    if sha and ours and sha == ours:
        check_dataset_usable(prefix, tokenizer.vocab_size, scan_ids=False)
        return {"vouched": True, "max_id": None}
    bin_path = os.path.abspath(normalize_prefix(prefix) + ".bin")
    try:
        stat = os.stat(bin_path)
        identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except OSError:
        identity = None  # check_dataset_usable names the missing file
    record = (scan_records or {}).get(bin_path)
    known = record.get("max_id") if isinstance(record, dict) and identity and all(
        record.get(k) == v for k, v in identity.items()) else None
    info = check_dataset_usable(prefix, tokenizer.vocab_size, scan_ids=True,
                                known_max_id=known if isinstance(known, int) else None)
    if scan_records is not None and identity:
        scan_records[bin_path] = dict(identity, max_id=info["max_id"])
    return {"vouched": False, "max_id": info["max_id"]}


SCAN_RECORD_FILE = "token_id_scan.json"


def check_corpora(prefixes: list[str], tokenizer, record_dir: str | None = None) -> list[str]:
    """`check_dataset_tokenizer` for every prefix, meant for one rank (the others skip it: a full scan of a
    30B-token corpus is 60 GB of reads). A data set no summary vouches for is scanned once; the result is kept
    in RECORD_DIR/token_id_scan.json by file size and modification time, so a restart does not scan again.
    -> one note per data set whose tokenizer could not be verified (its ids were checked)."""
    from nvium_dist.checkpoint_io import atomic_write_json

    path = os.path.join(record_dir, SCAN_RECORD_FILE) if record_dir else None
    records: dict = {}
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                loaded = json.load(f)
            records = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            records = {}  # a damaged record only costs a new scan
    notes = []
    for prefix in dict.fromkeys(prefixes):
        result = check_dataset_tokenizer(prefix, tokenizer, records)
        if not result["vouched"]:
            notes.append(f"{normalize_prefix(prefix)}.bin has no summary naming tokenizer {tokenizer.model_path}; "
                         f"its token ids were checked (highest {result['max_id']} < vocabulary "
                         f"{tokenizer.vocab_size}), the tokenizer itself cannot be verified")
    if path:
        os.makedirs(record_dir, exist_ok=True)
        atomic_write_json(Path(path), records)
    return notes


def ensure_helpers() -> None:
    """Make megatron's C++ dataset helpers importable, compiling them once (rank 0) if needed."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401

        return
    except ImportError:
        pass
    import subprocess

    import torch.distributed as dist

    import megatron.core.datasets as mds

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if rank0:
        d = os.path.dirname(os.path.abspath(mds.__file__))
        proc = subprocess.run(["make", "-C", d], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not compile megatron-core's dataset helpers in {d} (needs make, g++ and pybind11):\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    from megatron.core.datasets import helpers_cpp  # noqa: F401,F811


@contextlib.contextmanager
def _process_group_for_build(needed: bool):
    import torch.distributed as dist

    if not needed or not dist.is_available() or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _first_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_index_caches(cache_dirs: list[str]) -> None:
    """Raises DatasetFormatError naming an index-cache .npy that holds Python objects (a pickle: megatron only
    writes integer arrays, and such a file is never loaded, so the build would stop with numpy's unnamed "Array
    can't be memory-mapped")."""
    import numpy as np

    for directory in cache_dirs:
        for root, _, files in os.walk(directory):
            for name in sorted(f for f in files if f.endswith(".npy")):
                path = os.path.join(root, name)
                try:
                    with open(path, "rb") as f:
                        version = np.lib.format.read_magic(f)
                        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0)
                        _, _, dtype = read_header(f)
                except (OSError, ValueError) as err:
                    raise DatasetFormatError(f"{path} is not a readable numpy index ({err}); delete {directory} "
                                             "(megatron rebuilds its index cache)") from None
                if dtype.hasobject:
                    raise DatasetFormatError(f"{path} holds pickled Python objects, not an index megatron wrote; it "
                                             f"is not loaded. Delete {directory} (megatron rebuilds its index cache)")


def build_gpt_datasets(
    blend: list[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    tokenizer: SentencePieceTokenizer,
    cache_dir: str | None = None,
    valid_blend: list[str] | None = None,
    check_data: bool = True,
):
    """Build (train, valid, test) megatron GPTDataset/BlendedDataset objects (None for empty splits).

    blend: ``["A"]``, ``["A", "B"]`` (weights from sizes) or ``["0.3", "A", "0.7", "B"]``; prefixes
    are dataset prefixes (``X`` for ``X.bin/.idx``). split: ``"969,30,1"`` (train/valid/test
    fractions of each dataset's documents). num_samples: samples wanted per split (0 -> that split
    is None). valid_blend: a separate validation blend; then ``blend`` is used whole for training,
    ``split`` is ignored and there is no test split. Each item is a dict with ``tokens``/``labels``
    (LongTensor[seq_length], from a window of seq_length+1 tokens), ``loss_mask``, ``position_ids``.
    cache_dir: where megatron caches its index arrays (default: next to each dataset, in
    ``X/cache/``). check_data=False skips `check_dataset_tokenizer` (a caller that ran `check_corpora`
    once for all ranks). Deterministic in ``seed``.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three non-negative ints (train, valid, test), got {num_samples}")
    prefixes, weights = parse_blend(blend)
    valid = parse_blend(valid_blend) if valid_blend else None
    if check_data:
        for p in prefixes + (valid[0] if valid else []):
            check_dataset_tokenizer(p, tokenizer)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        warnings.filterwarnings("ignore", message=".*tp_group is None.*")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    ensure_helpers()

    common = dict(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    if valid is None:
        if split is None:
            raise ValueError("split is required (e.g. '969,30,1') unless valid_blend is given")
        config = GPTDatasetConfig(blend=(prefixes, weights), split=split, **common)
        n_datasets = len(prefixes)
    else:
        config = GPTDatasetConfig(blend_per_split=[(prefixes, weights), valid, None], **common)
        n_datasets = max(len(prefixes), len(valid[0]))
    sizes = [int(n) for n in num_samples]
    if valid is not None:
        sizes[2] = 0
        for i in (0, 1):
            if sizes[i] == 0:
                config.blend_per_split[i] = None
        if config.blend_per_split[0] is None and config.blend_per_split[1] is None:
            return (None, None, None)
    else:
        _drop_empty_splits(config, prefixes, sizes, split)
        if all(m is None for m in config.split_matrix):
            return (None, None, None)
    cache_dirs = [cache_dir] if cache_dir is not None else [
        os.path.join(p, "cache") for p in prefixes + (valid[0] if valid else [])]
    if _first_rank():  # the others may run while rank 0 writes these caches (megatron's rank-0-first build)
        check_index_caches(cache_dirs)
    with _process_group_for_build(needed=cache_dir is not None and n_datasets > 1):
        try:
            datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        except ValueError as err:
            if "memory-mapped" not in str(err):
                raise
            check_index_caches(cache_dirs)  # names the file when it is in a cache this code knows of
            raise DatasetFormatError(f"a megatron index cache file cannot be memory-mapped ({err}); delete the "
                                     f"index caches ({', '.join(cache_dirs)}): they are rebuilt") from None
    out = []
    for ds, n in zip(datasets, sizes):
        out.append(None if ds is None or n == 0 or len(ds) == 0 else ds)
    return tuple(out)


_SPLIT_NAMES = ("train", "valid", "test")


def _drop_empty_splits(config, prefixes: list[str], sizes: list[int], split: str) -> None:
    """Skip splits with no requested samples or no documents; refuse partly empty blends.

    megatron-core loops forever when a split with requested samples has zero tokens, so an empty
    split must never reach it: its split_matrix entry is set to None (the split is then None).
    """
    docs = {p: validate_indexed_files(p)["sequences"] for p in prefixes}
    for i, bounds in enumerate(config.split_matrix):
        if bounds is None:
            continue
        if sizes[i] == 0:
            config.split_matrix[i] = None
            continue
        lo, hi = bounds
        # the same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits
        empty = [p for p, n in docs.items() if int(round(hi * float(n))) - int(round(lo * float(n))) == 0]
        if len(empty) == len(prefixes):
            warnings.warn(
                f"the {_SPLIT_NAMES[i]} split of {split!r} holds no documents of {prefixes} "
                f"({', '.join(f'{n} docs' for n in docs.values())}); returning None for it"
            )
            config.split_matrix[i] = None
        elif empty:
            raise ValueError(
                f"split {split!r} leaves the {_SPLIT_NAMES[i]} split of {empty} with no documents "
                f"(they have {[docs[p] for p in empty]} documents), but {sizes[i]} {_SPLIT_NAMES[i]} samples "
                f"were requested from the blend. Fix: give that split a larger share, use more data, or "
                f"request 0 {_SPLIT_NAMES[i]} samples."
            )


def batch_iterator(
    dataset,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
    cycle: bool = True,
) -> Iterator[dict]:
    """Yield this DP rank's micro-batches: dict(tokens=LongTensor[b,s], labels=LongTensor[b,s], loss_mask=FloatTensor[b,s]).

    Global batch g covers samples ``consumed_samples + g*B .. + (g+1)*B`` (B = micro_batch_size*dp_size);
    rank r takes the contiguous slice ``[r*micro_batch_size, (r+1)*micro_batch_size)`` of it, so
    DP=2 sees exactly the samples DP=1 sees over 2 micro-batches. With ``cycle`` the sample index
    wraps around the dataset length; without it, iteration stops before the first incomplete
    global batch (every rank stops at the same step).
    """
    import torch

    if dataset is None:
        raise ValueError("dataset is None (its split is empty); check the split string and num_samples")
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got "
                         f"{micro_batch_size}, {dp_rank}, {dp_size}")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset has no samples")
    global_batch = micro_batch_size * dp_size
    pos = int(consumed_samples)
    while True:
        if not cycle and pos + global_batch > n:
            return
        start = pos + dp_rank * micro_batch_size
        items = [dataset[(start + i) % n] for i in range(micro_batch_size)]
        yield {
            "tokens": torch.stack([torch.as_tensor(x["tokens"]) for x in items]).long(),
            "labels": torch.stack([torch.as_tensor(x["labels"]) for x in items]).long(),
            "loss_mask": torch.stack([torch.as_tensor(x["loss_mask"]) for x in items]).float(),
        }
        pos += global_batch
