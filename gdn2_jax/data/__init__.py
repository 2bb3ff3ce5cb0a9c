"""Input pipelines (grain): synthetic associative recall, byte-level text, packed token files."""

from gdn2_jax.data.errors import DataError
from gdn2_jax.data.packed import BYTE_EOS, BYTE_VOCAB_SIZE, pack_window
from gdn2_jax.data.pipeline import (
    Sources,
    check_vocab,
    eval_batches,
    local_batch_size,
    make_sources,
    make_train_iterator,
)
from gdn2_jax.data.recall import RecallSource, vocab_layout

__all__ = [
    "BYTE_EOS",
    "BYTE_VOCAB_SIZE",
    "DataError",
    "RecallSource",
    "Sources",
    "check_vocab",
    "eval_batches",
    "local_batch_size",
    "make_sources",
    "make_train_iterator",
    "pack_window",
    "vocab_layout",
]
