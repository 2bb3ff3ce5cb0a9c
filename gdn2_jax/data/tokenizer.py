"""The tokenizer files people already have: a Hugging Face `tokenizer.json` (the `tokenizers`
library) or a SentencePiece `.model` (such as Llama-2's), behind one small interface.

Documents are encoded without special tokens (no BOS): the preparation tool closes each with
the end-of-document id itself, which is the only document marker the model sees.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from gdn2_jax.data.errors import DataError

# End-of-document tokens looked up, in order, when a tokenizer.json's is not named.
KNOWN_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """What the token files record about the tokenizer that made them."""

    path: str
    kind: str  # "tokenizers" | "sentencepiece"
    sha256: str
    vocab_size: int
    eos_id: int
    eos_token: str


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_path(path: str | Path) -> Path:
    """A tokenizer file, or a model folder holding tokenizer.json or tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"--tokenizer {path}: the folder has no tokenizer.json or tokenizer.model")
    if not path.is_file():
        raise DataError(f"--tokenizer {path}: no such file")
    if path.suffix not in (".json", ".model"):
        raise DataError(
            f"--tokenizer {path}: expected a tokenizer.json (Hugging Face tokenizers) or a "
            f"SentencePiece .model, not {path.suffix!r}"
        )
    return path


class Tokenizer:
    """`encode_batch(texts)` -> token ids per text, `decode(ids)` -> text, and `info`."""

    info: TokenizerInfo

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path, eos_token: str | None):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(str(path))
        # Text that spells a special token ("<|endoftext|>" in a web page) is text: only the
        # preparation tool ends a document.
        self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        names = (eos_token,) if eos_token else KNOWN_EOS_TOKENS
        found = next((t for t in names if t in vocab), None)
        if found is None:
            raise DataError(
                f"--eos-token: {path} has no token {'/'.join(names)}; name its "
                "end-of-document token with --eos-token"
            )
        size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        self.info = TokenizerInfo(
            str(path), "tokenizers", file_sha256(path), size, vocab[found], found
        )

    def encode_batch(self, texts):
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, eos_token: str | None):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        if eos_token:
            eos = self._sp.piece_to_id(eos_token)
            if self._sp.id_to_piece(eos) != eos_token:
                raise DataError(f"--eos-token: {path} has no piece {eos_token!r}")
        else:
            eos = self._sp.eos_id()
            if eos < 0:
                raise DataError(
                    f"--eos-token: {path} defines no end-of-sentence piece; name one with "
                    "--eos-token"
                )
        self.info = TokenizerInfo(
            str(path), "sentencepiece", file_sha256(path), self._sp.get_piece_size(), eos,
            self._sp.id_to_piece(eos),
        )  # fmt: skip

    def encode_batch(self, texts):
        return self._sp.encode(list(texts))

    def decode(self, ids):
        return self._sp.decode(list(ids))


def load_tokenizer(path: str | Path, eos_token: str | None = None) -> Tokenizer:
    path = resolve_path(path)
    if path.suffix == ".json":
        return HFTokenizer(path, eos_token)
    return SentencePieceTokenizer(path, eos_token)


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path) -> Path:
    """A byte-level BPE tokenizer.json trained on `texts` (with `<|endoftext|>`): exact round
    trips, for examples and tests where no tokenizer file is at hand."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out
