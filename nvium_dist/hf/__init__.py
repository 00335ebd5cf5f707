"""Hugging Face interop: nvium exports <-> transformers directories, the paper's checkpoints -> exports.

`weights` maps parameter names and reads transformers directories, `tokenizer` turns a SentencePiece model
into transformers tokenizer files, `to_hf` / `from_hf` are what the two conversion CLIs run, and
`modeling_nvium` is the self-contained transformers model copied into N-vium directories.
"""
