"""Train a SentencePiece model with nvium's special ids (see nvium_dist/data/tokenizer.py)."""

from __future__ import annotations

import json
import os
import time
from typing import Iterable, Iterator

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, SentencePieceTokenizer

MAX_SENTENCE_BYTES = 8192


def training_sentences(texts: Iterable[str], max_bytes: int | None = None) -> Iterator[str]:
    """Cut documents into training "sentences": paragraphs (blank-line separated), long ones cut at lines.

    Newlines inside a paragraph are kept, so the model learns '\\n' pieces (identity normalisation
    keeps them through encode/decode). Stops after ``max_bytes`` of text when given.
    """
    seen = 0
    for text in texts:
        for para in text.split("\n\n"):
            if not para.strip():
                continue
            if len(para.encode("utf-8")) <= MAX_SENTENCE_BYTES:
                pieces = [para]
            else:
                pieces, cur, size = [], [], 0
                for line in para.split("\n"):
                    n = len(line.encode("utf-8")) + 1
                    if cur and size + n > MAX_SENTENCE_BYTES:
                        pieces.append("\n".join(cur))
                        cur, size = [], 0
                    cur.append(line[: MAX_SENTENCE_BYTES // 4] if n > MAX_SENTENCE_BYTES else line)
                    size += n
                if cur:
                    pieces.append("\n".join(cur))
            for p in pieces:
                yield p
                seen += len(p.encode("utf-8"))
                if max_bytes is not None and seen >= max_bytes:
                    return


def reservoir_sample(items: Iterable[str], k: int, seed: int) -> list[str]:
    """k items drawn uniformly from a stream (Algorithm R, seeded), returned in stream order."""
    import random

    rng = random.Random(seed)
    sample: list[tuple[int, str]] = []
    for i, x in enumerate(items):
        if i < k:
            sample.append((i, x))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                sample[j] = (i, x)
    return [x for _, x in sorted(sample)]


def train_sentencepiece(
    texts: Iterable[str],
    output_prefix: str,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    input_sentence_size: int = 0,
    max_input_bytes: int | None = None,
    seed: int = 1234,
    character_coverage: float = 0.9999,
    num_threads: int | None = None,
    user_defined_symbols: list[str] | None = None,
) -> dict:
    """Train and write ``output_prefix.model`` / ``.vocab`` (+ ``.json`` with the settings); return that info.

    Special ids: unk=0, bos=1, eos=eod=2, pad=3. Byte fallback is on (no unknown characters),
    normalisation is the identity (decode(encode(s)) == s for any UTF-8 text), digits are split.
    ``input_sentence_size`` > 0 samples that many sentences (reservoir sampling seeded by ``seed``,
    memory bounded by the sample) from the stream; ``max_input_bytes`` stops reading the inputs after that many bytes (UTF-8).
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if not 0.98 <= character_coverage <= 1.0:  # SentencePiece's own bound, which it reports as an internal error
        raise ValueError(f"character_coverage must be in [0.98, 1], got {character_coverage}")
    if vocab_size < 260 + 4:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: byte fallback alone needs 256 byte pieces plus 4 "
            f"special tokens; use --vocab-size >= 300 (e.g. 512 for tests, 32000 for real runs)"
        )
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    spm.set_random_generator_seed(int(seed))
    counter = {"sentences": 0, "characters": 0}

    def counted() -> Iterator[str]:
        for s in training_sentences(texts, max_input_bytes):
            counter["sentences"] += 1
            counter["characters"] += len(s)
            yield s

    t0 = time.time()
    sentences = counted()
    if input_sentence_size and input_sentence_size > 0:
        # our own seeded reservoir sample: SentencePiece's sampler is not reproducible across
        # processes even with set_random_generator_seed (measured with 0.2.x)
        sentences = iter(reservoir_sample(sentences, int(input_sentence_size), int(seed)))
    tmp_prefix = output_prefix + ".tmp"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_prefix=tmp_prefix,
            vocab_size=int(vocab_size),
            model_type=model_type,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=character_coverage,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            pad_piece="<pad>",
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=MAX_SENTENCE_BYTES * 4,
            num_threads=int(num_threads or min(16, os.cpu_count() or 1)),
            user_defined_symbols=user_defined_symbols or [],
            minloglevel=2,
            hard_vocab_limit=True,
        )
    except RuntimeError as err:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.remove(tmp_prefix + ext)
        msg = str(err)
        if counter["sentences"] == 0:
            raise ValueError("no training text: the inputs hold no non-empty documents") from err
        if "smaller than required_chars" in msg:  # more distinct characters than pieces
            raise ValueError(
                f"vocab_size={vocab_size} is too small for the characters of this input ({msg.strip()}); "
                f"use a larger --vocab-size or a lower --character-coverage"
            ) from err
        if "Vocabulary size is too high" in msg or "vocab_size" in msg:
            raise ValueError(
                f"SentencePiece could not reach vocab_size={vocab_size} on this input ({msg.strip()}); "
                f"use a smaller --vocab-size or more text"
            ) from err
        raise
    if counter["sentences"] == 0:
        raise ValueError("no training text: the inputs hold no non-empty documents")
    os.replace(tmp_prefix + ".model", output_prefix + ".model")
    os.replace(tmp_prefix + ".vocab", output_prefix + ".vocab")
    tok = SentencePieceTokenizer(output_prefix + ".model")
    info = {
        "model": output_prefix + ".model",
        "vocab": output_prefix + ".vocab",
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "model_type": model_type,
        "special_ids": tok.special_ids,
        "byte_fallback": True,
        "normalization": "identity",
        "seed": seed,
        "input_sentence_size": input_sentence_size,
        "max_input_bytes": max_input_bytes,
        "sentences_read": counter["sentences"],
        "characters_read": counter["characters"],
        "seconds": round(time.time() - t0, 3),
    }
    with open(output_prefix + ".json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info
