"""A SentencePiece model (nvium's tokenizer) as transformers tokenizer files that give the same ids.

nvium encodes with SentencePiece directly: a dummy-prefix "▁", spaces as "▁", byte fallback, no BOS, and
"<s>"/"</s>" in the text are plain characters (they never become control ids). The tokenizers-library
equivalent is a Prepend("▁") + Replace(" ", "▁") normalizer in front of the BPE/Unigram model, no
pre-tokenizer, and `split_special_tokens=True`; transformers' own LLaMA tokenizer instead uses a Metaspace
pre-tokenizer, which drops the dummy prefix in front of leading spaces, and adds BOS. The written files
are checked against SentencePiece on probe strings before they are kept. One known difference, for
Unigram models only: the tokenizers library's Unigram can pick a control piece ("</s>") for that literal
text, which SentencePiece never does; BPE models (the default of tools/train_tokenizer.py) match.
"""
from __future__ import annotations

import os
from pathlib import Path

PROBES = ["Hello world", "  two leading spaces", "tabs\tand\nnewlines\n\n", "ünïcödé 日本語 🙂",
          "1234567 digits", " ", "a  b   c", "</s> <s> <pad> are text", "trailing  ", "▁already▁marked▁", ""]


class TokenizerConversionError(ValueError):
    """The SentencePiece model cannot be reproduced by a transformers tokenizer."""


def write_hf_tokenizer(spm_path: str | os.PathLike, out_dir: str | os.PathLike, probes: list[str] | None = None
                       ) -> list[str]:
    """Writes tokenizer.json, tokenizer_config.json (and the special-token map) into `out_dir` and copies
    the .model next to them; returns the written file names. Raises TokenizerConversionError when the
    normalisation cannot be reproduced or the result encodes a probe differently."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extractor = SentencePieceExtractor(str(spm_path))
    proto = extractor.proto
    normalizer = proto.normalizer_spec
    if normalizer.precompiled_charsmap or normalizer.remove_extra_whitespaces:
        raise TokenizerConversionError(
            f"{spm_path} normalises text (rule {normalizer.name!r}, remove_extra_whitespaces="
            f"{normalizer.remove_extra_whitespaces}); only identity-normalised SentencePiece models (as "
            "tools/train_tokenizer.py and LLaMA write) convert exactly")
    unigram = proto.trainer_spec.model_type == 1
    if unigram:
        model = Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=proto.trainer_spec.unk_id,
                        byte_fallback=proto.trainer_spec.byte_fallback)
    else:
        parts = extractor.extract(BPE)
        model = BPE(vocab=parts["vocab"], merges=parts["merges"], fuse_unk=True,
                    unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
                    byte_fallback=proto.trainer_spec.byte_fallback)
    tokenizer = Tokenizer(model)
    steps = [normalizers.Prepend("▁")] if normalizer.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    decoding = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if normalizer.add_dummy_prefix:
        decoding.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(decoding)
    sp = spm.SentencePieceProcessor()
    sp.Load(str(spm_path))
    specials = {"unk_token": sp.unk_id(), "bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "pad_token": sp.pad_id()}
    specials = {name: sp.IdToPiece(i) for name, i in specials.items() if i >= 0}
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in specials.values()])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, split_special_tokens=True, add_bos_token=False,
                                      add_eos_token=False, clean_up_tokenization_spaces=False, **specials)
    for text in PROBES + list(probes or []):
        if unigram and any(piece in text for piece in specials.values()):
            continue  # a Unigram model scores the literal control pieces as text; see the module docstring
        ours, theirs = sp.EncodeAsIds(text), wrapped.encode(text, add_special_tokens=False)
        if ours != theirs:
            raise TokenizerConversionError(
                f"the converted tokenizer encodes {text[:40]!r} as {theirs[:12]} but SentencePiece gives {ours[:12]}")
    out_dir = Path(out_dir)
    written = wrapped.save_pretrained(str(out_dir))
    (out_dir / "tokenizer.model").write_bytes(Path(spm_path).read_bytes())
    return sorted({Path(p).name for p in written} | {"tokenizer.model"})
