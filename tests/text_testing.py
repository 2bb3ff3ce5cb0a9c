"""Text the tests make and the tokenizers they train on it: a tiny byte-level BPE (tokenizers)
and a tiny SentencePiece model, so that no test needs a download."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from gdn2_jax.data.tokenizer import train_bpe

WORDS = (
    *("the", "a", "gate", "erases", "and", "writes", "state", "keys", "values", "decay"),
    *("chunk", "token", "model", "learns", "from", "text", "rule", "delta", "each", "head"),
    *("sees", "café", "naïve", "漢字", "über"),
)


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 30))]
        docs.append(" ".join(words) + rng.choice([".", "!", "?\n"]))
    return docs


def write_corpus(folder: Path, n: int = 240, seed: int = 0) -> dict[str, list[str]]:
    """The same kind of text in every supported format: file name -> its documents in order."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = documents(n, seed)
    parts = {
        "a.jsonl": docs[: n // 3],
        "b.parquet": docs[n // 3 : n // 2],
        "c.jsonl.gz": docs[n // 2 : 2 * n // 3],
        "d.jsonl.zst": docs[2 * n // 3 : n - 1],
        "e.txt": docs[n - 1 :],
    }
    lines = {k: "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(v))
             for k, v in parts.items()}  # fmt: skip
    (folder / "a.jsonl").write_text(lines["a.jsonl"])
    pq.write_table(pa.table({"text": parts["b.parquet"]}), folder / "b.parquet")
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(lines["c.jsonl.gz"].encode()))
    zst = zstandard.ZstdCompressor().compress(lines["d.jsonl.zst"].encode())
    (folder / "d.jsonl.zst").write_bytes(zst)
    (folder / "e.txt").write_text(parts["e.txt"][0])
    return parts


def bpe(path: Path, vocab_size: int = 300) -> Path:
    return train_bpe(documents(400, seed=1), vocab_size, path)


def sentencepiece_model(path: Path, vocab_size: int = 300) -> Path:
    """A BPE SentencePiece model with byte fallback and no normalization, so that
    decode(encode(text)) == text exactly; ids: 0 <unk>, 1 <s>, 2 </s>."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(documents(400, seed=1)),
        model_prefix=str(path.with_suffix("")),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    return path.with_suffix(".model")
