"""SentencePiece tokenizer wrapper and the special-token convention of nvium.

Special token ids (fixed by ``tools/train_tokenizer.py``; checked when a model is loaded):

    unk = 0   <unk>
    bos = 1   <s>
    eos = 2   </s>   (also the end-of-document token: eod == eos)
    pad = 3   <pad>  (never produced by encode; megatron's GPTDataset masks it out of the loss)

Imports only sentencepiece (no torch), so CLIs using it start fast.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SPECIAL_PIECES = {UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>", PAD_ID: "<pad>"}


def file_sha256(path: str, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class SentencePieceTokenizer:
    """A SentencePiece model with nvium's special ids.

    Usable as the ``tokenizer`` of megatron-core's GPTDatasetConfig (it provides ``vocab_size``,
    ``eod``, ``pad`` and ``unique_identifiers``, which megatron hashes into its index-cache names).
    Picklable (re-loads the model file), so it can travel to DataLoader workers.
    """

    def __init__(self, model_path: str):
        import sentencepiece as spm

        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model {model_path!r} does not exist; train one with "
                f"`python tools/train_tokenizer.py --output-prefix PREFIX` (writes PREFIX.model)"
            )
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except Exception as err:  # sentencepiece raises OSError/RuntimeError with a terse message
            raise ValueError(
                f"{model_path!r} is not a readable SentencePiece model ({err}); pass the .model file "
                f"written by tools/train_tokenizer.py (not the .vocab file)"
            ) from err
        self.vocab_size: int = int(self._sp.GetPieceSize())
        self.unk: int = int(self._sp.unk_id())
        self.bos: int = int(self._sp.bos_id())
        self.eos: int = int(self._sp.eos_id())
        self.eod: int = self.eos
        self.pad: int = int(self._sp.pad_id())
        self.sha256: str = file_sha256(model_path)
        # megatron-core json-dumps the config, calling `obj.unique_identifiers` on the tokenizer
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("sha256", self.sha256), ("vocab_size", self.vocab_size)]
        )

    # --- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.Encode(texts, out_type=int, num_threads=1)

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    @property
    def special_ids(self) -> dict[str, int]:
        return {"unk": self.unk, "bos": self.bos, "eos": self.eos, "eod": self.eod, "pad": self.pad}

    # megatron-core's tokenizer vocabulary names
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids) -> str:
        return self.decode(ids)

    def __len__(self) -> int:
        return self.vocab_size

    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def check_vocab_fits(tokenizer_vocab: int, model_vocab: int, path) -> None:
    """Raise ValueError when token ids of the tokenizer (0..tokenizer_vocab-1) overflow the model's embedding."""
    if int(tokenizer_vocab) > int(model_vocab):
        raise ValueError(
            f"tokenizer {os.fspath(path)!r} has {tokenizer_vocab} tokens but the model's vocabulary has only "
            f"{model_vocab} rows: ids >= {model_vocab} would index past the embedding. Fix: set the model's "
            f"vocab_size to at least {tokenizer_vocab} (pad it up to a multiple of 128 x TP), or retrain the "
            f"tokenizer with `tools/train_tokenizer.py --vocab-size {model_vocab}` and re-run preprocess_data.py."
        )
