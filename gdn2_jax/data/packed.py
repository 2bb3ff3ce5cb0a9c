"""Packed language-model windows over a flat token stream: byte-level text or token files.

Documents are laid end to end, each closed by an end-of-document token, and the stream is cut
into fixed windows. `segment_ids` number the documents inside a window so that the model resets
its recurrent state at each boundary; the prediction made from an end-of-document token (the
next document's first token) is masked out of the loss, since nothing before a reset informs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gdn2_jax.data import documents
from gdn2_jax.data.errors import DataError

# Byte-level text: the 256 byte values, then one end-of-document token.
BYTE_EOS = 256
BYTE_VOCAB_SIZE = 257


def byte_stream(paths: Sequence[str], jsonl_field: str = "text") -> np.ndarray:
    """All documents of all files as one uint16 stream of bytes, each followed by BYTE_EOS."""
    if not paths:
        raise DataError("data.kind='text' needs data.paths (.txt, .jsonl or .parquet files)")
    parts = []
    for path in paths:
        for doc in documents.iter_documents(path, jsonl_field):
            parts.append(np.frombuffer(doc.encode("utf-8"), np.uint8).astype(np.uint16))
            parts.append(np.array([BYTE_EOS], np.uint16))
    stream = np.concatenate(parts)
    if np.all(stream == BYTE_EOS):
        raise DataError(
            f"data.paths: every document in {', '.join(paths)} is empty (no text to learn from)"
        )
    return stream


class PackedWindows:
    """Random-access windows of `seq_len + 1` tokens (inputs and shifted targets) over streams.

    Windows never straddle two files; consecutive windows share one token (the last target of
    one is the first input of the next), so every token is predicted once. With `pad_last`
    each file's last, shorter window is kept, padded with end-of-document tokens that carry no
    loss (evaluation scores every token); otherwise it is dropped.
    """

    def __init__(
        self, streams: Sequence[np.ndarray], seq_len: int, eos_id: int, pad_last: bool = False
    ):
        self.streams, self.seq_len, self.eos_id = list(streams), seq_len, eos_id
        self.pad_last = pad_last
        round_up = seq_len - 1 if pad_last else 0
        counts = [max(0, (len(s) - 1 + round_up) // seq_len) for s in self.streams]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise DataError(f"no window of {seq_len + 1} tokens fits in the data")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        f = int(np.searchsorted(self.offsets, index, side="right")) - 1
        start = (int(index) - int(self.offsets[f])) * self.seq_len
        window = np.asarray(self.streams[f][start : start + self.seq_len + 1], np.int64)
        real = len(window) - 1
        window = np.pad(window, (0, self.seq_len + 1 - len(window)), constant_values=self.eos_id)
        example = pack_window(window, self.eos_id)
        example["loss_mask"][real:] = 0
        return example


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
