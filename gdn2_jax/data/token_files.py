"""Token files as they enter training and evaluation, checked before any step runs.

`data.paths` names token files (.npy, whose dtype is the file's; raw .bin, whose dtype must be
declared as `data.token_dtype` or come from a `metadata.json` beside it) or folders written by
`gdn2_jax.data.prepare` (their train split; their held-out split is the eval data). Refused with
an error naming the file: a dtype that is not an integer or disagrees with the metadata, a size
that disagrees with it, an empty file, an id outside [0, vocabulary) (with its offset), data that
is all end-of-document tokens, and an end-of-document id that disagrees with the metadata.

Files without metadata are scanned once per process (min and max id); files with it are
trusted for their content (the preparation tool checked every id) and checked for their size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gdn2_jax.data.errors import DataError

SCAN_CHUNK = 1 << 24
# What gdn2_jax.data.prepare writes beside the shards, last and atomically.
METADATA = "metadata.json"
FORMAT = "gdn2-jax-tokens"


@dataclasses.dataclass(frozen=True)
class TokenFile:
    path: str
    tokens: np.ndarray  # flat, memory-mapped
    min_id: int
    max_id: int
    # Every token is the end-of-document id (nothing to learn from).
    all_eos: bool
    # UTF-8 bytes of the documents' text, where the preparation tool recorded them.
    text_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class TokenData:
    train: tuple[TokenFile, ...]
    # Held-out files: data.eval_paths, or the prepared folders' eval splits (empty if neither).
    eval: tuple[TokenFile, ...]
    eos_id: int
    # The tokenizer's vocabulary (metadata), else the largest id seen + 1.
    vocab_size: int
    # The prepared folders and shards met, in data.paths order.
    prepared: tuple[Prepared, ...]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A folder that gdn2_jax.data.prepare wrote, and its metadata.json."""

    folder: str
    meta: dict


def read_metadata(folder: str | Path) -> dict:
    path = Path(folder) / METADATA
    if not path.is_file():
        raise DataError(
            f"{folder}: a folder in data.paths must be prepared by gdn2_jax.data.prepare "
            f"(no {METADATA} in it)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != 1:
        raise DataError(f"{path}: not a {FORMAT} version 1 metadata file")
    return meta


def _sidecar(path: Path) -> tuple[Prepared, dict] | None:
    """The metadata and file entry of a prepared shard named directly, if it has them."""
    if not (path.parent / METADATA).is_file():
        return None
    meta = read_metadata(path.parent)
    for split in meta["splits"].values():
        for entry in split["files"]:
            if entry["path"] == path.name:
                return Prepared(str(path.parent), meta), entry
    return None


def _map(path: Path, declared: str | None, meta: dict | None) -> np.ndarray:
    """The file's tokens in the dtype it really has, refusing any that is not known."""
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.dtype.kind not in "ui":
            raise DataError(
                f"{path}: holds {tokens.dtype} values; token ids must be an integer dtype "
                "(uint16, uint32, int32)"
            )
        if declared is not None and np.dtype(declared) != tokens.dtype:
            raise DataError(f"data.token_dtype={declared} but {path} holds {tokens.dtype}")
        return tokens
    if path.suffix != ".bin":
        raise DataError(f"{path}: token files are .npy or .bin, not {path.suffix!r}")
    dtype = meta["dtype"] if meta else declared
    if meta and declared is not None and declared != dtype:
        raise DataError(
            f"data.token_dtype={declared} but {path.parent / METADATA} says {path.name} is {dtype}"
        )
    if dtype is None:
        raise DataError(
            f"{path}: a raw .bin records no dtype; declare it with data.token_dtype (uint16, "
            f"uint32 or int32), or name the folder gdn2_jax.data.prepare wrote"
        )
    size, item = path.stat().st_size, np.dtype(dtype).itemsize
    if size % item:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype} tokens")
    return np.memmap(path, dtype=np.dtype(dtype), mode="r") if size else np.zeros(0, dtype)


@functools.lru_cache(maxsize=4096)
def _scan(path: str, size: int, mtime_ns: int, dtype: str, eos_id: int) -> tuple[int, int, bool]:
    """(min id, max id, all eos) of an unchanged file, read in chunks."""
    tokens = _map(Path(path), dtype, None) if path.endswith(".bin") else np.load(path, "r")
    lo, hi, all_eos = np.inf, -np.inf, True
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = tokens[start : start + SCAN_CHUNK]
        lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
        all_eos = all_eos and bool(np.all(chunk == eos_id))
    return int(lo), int(hi), all_eos


def first_offset(tokens: np.ndarray, bad) -> int:
    """Index of the first token where `bad(chunk)` holds."""
    for start in range(0, len(tokens), SCAN_CHUNK):
        hits = np.flatnonzero(bad(np.asarray(tokens[start : start + SCAN_CHUNK])))
        if hits.size:
            return start + int(hits[0])
    raise AssertionError("first_offset: no such token")


def open_file(path: str | Path, declared: str | None, eos_id: int, entry: dict | None,
              meta: dict | None) -> TokenFile:  # fmt: skip
    """A checked file; `entry` is its record in `meta` (a prepared folder's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.paths: no such token file {path}")
    tokens = _map(path, declared, meta)
    if tokens.ndim != 1:
        raise DataError(f"{path}: expected a flat token array, got shape {tokens.shape}")
    if len(tokens) == 0:
        raise DataError(f"{path}: the file holds no tokens")
    if entry is not None:
        if len(tokens) != entry["tokens"]:
            raise DataError(
                f"{path}: {len(tokens)} {tokens.dtype} tokens, but {path.parent / METADATA} "
                f"records {entry['tokens']} (the file was changed or cut short)"
            )
        all_eos = entry["tokens"] == entry["documents"]
        return TokenFile(str(path), tokens, 0, entry["max_id"], all_eos, entry["bytes"])
    st = os.stat(path)
    lo, hi, all_eos = _scan(str(path), st.st_size, st.st_mtime_ns, str(tokens.dtype), eos_id)
    if lo < 0:
        offset = first_offset(tokens, lambda c: c < 0)
        raise DataError(f"{path}: token id {int(tokens[offset])} at offset {offset} is negative")
    return TokenFile(str(path), tokens, lo, hi, all_eos)


# (path, its metadata entry, its folder) for each file to open.
Spec = tuple[Path, dict | None, Prepared | None]


def _resolve(paths: Sequence[str], split: str) -> tuple[list[Spec], list[Spec], list[Prepared]]:
    """The files `paths` name for `split`, the held-out files their folders add, the folders."""
    files, held_out, prepared = [], [], []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            p = Prepared(str(path), read_metadata(path))
            prepared.append(p)
            for which, out in ((split, files), ("eval", held_out)):
                out += [(path / e["path"], e, p) for e in p.meta["splits"][which]["files"]]
            continue
        folder, entry = _sidecar(path) or (None, None)
        if folder is not None:
            prepared.append(folder)
        files.append((path, entry, folder))
    return files, held_out, prepared


def _eos(declared: int | None, prepared: list[Prepared]) -> int:
    ids = {p.meta["eos_id"]: p.folder for p in prepared}
    if len(ids) > 1:
        raise DataError(
            f"data.paths: the prepared folders disagree on the end-of-document id {ids}"
        )
    if ids:
        ((eos, folder),) = ids.items()
        if declared is not None and declared != eos:
            raise DataError(
                f"data.eos_id={declared} but {Path(folder) / METADATA} says the end-of-document "
                f"id is {eos}"
            )
        return eos
    if declared is None:
        raise DataError(
            "data.eos_id: token files without a metadata.json need their end-of-document id "
            "declared"
        )
    return declared


def _one_tokenizer(prepared: list[Prepared]) -> None:
    hashes = {p.meta["tokenizer"]["sha256"]: p.folder for p in prepared}
    if len(hashes) > 1:
        raise DataError(
            f"data.paths: the prepared folders were tokenized by different tokenizers "
            f"({', '.join(hashes.values())})"
        )


def load(paths: Sequence[str], eval_paths: Sequence[str], token_dtype: str | None,
         eos_id: int | None) -> TokenData:  # fmt: skip
    """The checked train and held-out files (see the module docstring)."""
    if not paths:
        raise DataError("data.kind='tokens' needs data.paths (token files or a prepared folder)")
    train_specs, eval_specs, prepared = _resolve(paths, "train")
    if eval_paths:
        eval_specs, _, more = _resolve(eval_paths, "eval")
        prepared += more
    eos = _eos(eos_id, prepared)
    _one_tokenizer(prepared)
    train = tuple(
        open_file(p, token_dtype, eos, e, m.meta if m else None) for p, e, m in train_specs
    )
    held = tuple(open_file(p, token_dtype, eos, e, m.meta if m else None) for p, e, m in eval_specs)
    for where, files in (("data.paths", train), ("the held-out data", held)):
        if files and all(f.all_eos for f in files):
            raise DataError(
                f"{where}: every token is the end-of-document id {eos} (all padding: no text to "
                f"learn from) in {', '.join(f.path for f in files)}"
            )
    vocab = max([p.meta["vocab_size"] for p in prepared] + [f.max_id + 1 for f in train + held])
    return TokenData(train, held, eos, vocab, tuple(prepared))


def check_model_vocab(data: TokenData, vocab_size: int) -> None:
    """Every id the model will see is in [0, vocab_size): its embedding has that many rows."""
    for p in data.prepared:
        if p.meta["vocab_size"] > vocab_size:
            raise DataError(
                f"model.vocab_size={vocab_size} is smaller than the vocabulary of the tokenizer "
                f"that prepared {p.folder} ({p.meta['vocab_size']}, {p.meta['tokenizer']['path']})"
            )
    if data.eos_id >= vocab_size:
        raise DataError(
            f"the end-of-document id {data.eos_id} is outside the model's vocabulary "
            f"[0, {vocab_size}) (model.vocab_size)"
        )
    for f in data.train + data.eval:
        if f.max_id >= vocab_size:
            offset = first_offset(f.tokens, lambda c: c >= vocab_size)
            raise DataError(
                f"{f.path}: token id {int(f.tokens[offset])} at offset {offset} is outside "
                f"[0, {vocab_size}) (model.vocab_size={vocab_size})"
            )
