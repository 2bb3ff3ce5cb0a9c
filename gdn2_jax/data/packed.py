"""Packed language-model windows over a flat token stream: byte-level text or token files.

Documents are laid end to end, each closed by an end-of-document token, and the stream is cut
into fixed windows. `segment_ids` number the documents inside a window so that the model resets
its recurrent state at each boundary; the prediction made from an end-of-document token (the
next document's first token) is masked out of the loss, since nothing before a reset informs it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Byte-level text: the 256 byte values, then one end-of-document token.
BYTE_EOS = 256
BYTE_VOCAB_SIZE = 257


def read_documents(path: str | Path, jsonl_field: str = "text") -> list[bytes]:
    """A .txt file is one document; a .jsonl file holds one document per line."""
    path = Path(path)
    if path.suffix == ".txt":
        return [path.read_bytes()]
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if jsonl_field not in record:
                    raise ValueError(f"{path}:{lineno}: no field {jsonl_field!r}")
                docs.append(record[jsonl_field].encode("utf-8"))
        return docs
    raise ValueError(f"{path}: byte-level text reads .txt or .jsonl files, not {path.suffix!r}")


def byte_stream(paths: Sequence[str], jsonl_field: str = "text") -> np.ndarray:
    """All documents of all files as one uint16 stream of bytes, each followed by BYTE_EOS."""
    if not paths:
        raise ValueError("data.kind='text' needs data.paths (.txt or .jsonl files)")
    parts = []
    for path in paths:
        for doc in read_documents(path, jsonl_field):
            parts.append(np.frombuffer(doc, np.uint8).astype(np.uint16))
            parts.append(np.array([BYTE_EOS], np.uint16))
    return np.concatenate(parts)


def load_tokens(path: str | Path, dtype: str) -> np.ndarray:
    """Memory-maps a flat token file: .npy (its own dtype) or raw .bin (`dtype`)."""
    path = Path(path)
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
    elif path.suffix == ".bin":
        tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    else:
        raise ValueError(f"{path}: token files are .npy or .bin, not {path.suffix!r}")
    if tokens.ndim != 1:
        raise ValueError(f"{path}: expected a flat token array, got shape {tokens.shape}")
    return tokens


def token_streams(paths: Sequence[str], dtype: str) -> list[np.ndarray]:
    if not paths:
        raise ValueError("data.kind='tokens' needs data.paths (.npy or .bin token files)")
    return [load_tokens(p, dtype) for p in paths]


class PackedWindows:
    """Random-access windows of `seq_len + 1` tokens (inputs and shifted targets) over streams.

    Windows never straddle two files; consecutive windows share one token (the last target of
    one is the first input of the next), so every token is predicted once.
    """

    def __init__(self, streams: Sequence[np.ndarray], seq_len: int, eos_id: int):
        self.streams, self.seq_len, self.eos_id = list(streams), seq_len, eos_id
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.streams]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise ValueError(f"no window of {seq_len + 1} tokens fits in the data")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        f = int(np.searchsorted(self.offsets, index, side="right")) - 1
        start = (int(index) - int(self.offsets[f])) * self.seq_len
        window = np.asarray(self.streams[f][start : start + self.seq_len + 1], np.int64)
        return pack_window(window, self.eos_id)


def pack_window(window: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    inputs = window[:-1]
    is_eos = inputs == eos_id
    # A token after an end-of-document token starts the next segment.
    segment_ids = 1 + np.concatenate([[0], np.cumsum(is_eos)[:-1]])
    return {
        "inputs": inputs.astype(np.int32),
        "targets": window[1:].astype(np.int32),
        "loss_mask": (~is_eos).astype(np.float32),
        "segment_ids": segment_ids.astype(np.int32),
    }
