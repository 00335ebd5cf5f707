"""nvium data stack: tokenizer, corpus tools and megatron-core datasets.

Public API (imported lazily, so `import nvium_dist.data` does not pull in torch or megatron):

    SentencePieceTokenizer(model_path)           .vocab_size .bos .eos .eod(==eos) .pad .unk .encode .decode
    check_vocab_fits(tokenizer_vocab, model_vocab, path)   ValueError naming the file and the fix
    build_gpt_datasets(blend, split, seq_length, seed, num_samples, tokenizer, cache_dir=None, valid_blend=None)
    batch_iterator(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples=0, cycle=True)
    parse_blend(blend)
    open_indexed_dataset(prefix, vocab_size=None)   validated megatron IndexedDataset
    validate_indexed_files(prefix, vocab_size=None) DatasetFormatError
    preprocess(inputs, output_prefix, tokenizer_model, ...)   PreprocessError
    merge_datasets(prefixes, output_prefix)
    train_sentencepiece(texts, output_prefix, vocab_size, ...)
    build_default_corpus(output_dir, unit="scene", valid_fraction=0.05, seed=1234), iter_documents(unit)

Special token ids: unk=0, bos=1, eos=eod=2, pad=3.
"""

import importlib

_EXPORTS = {
    "SentencePieceTokenizer": "tokenizer",
    "check_vocab_fits": "tokenizer",
    "UNK_ID": "tokenizer",
    "BOS_ID": "tokenizer",
    "EOS_ID": "tokenizer",
    "PAD_ID": "tokenizer",
    "build_gpt_datasets": "gpt_data",
    "batch_iterator": "gpt_data",
    "parse_blend": "gpt_data",
    "check_dataset_tokenizer": "gpt_data",
    "open_indexed_dataset": "indexed",
    "validate_indexed_files": "indexed",
    "DatasetFormatError": "indexed",
    "preprocess": "preprocess",
    "PreprocessError": "preprocess",
    "merge_datasets": "merge",
    "train_sentencepiece": "spm_train",
    "build_default_corpus": "default_corpus",
    "iter_documents": "default_corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
