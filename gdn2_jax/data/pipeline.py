"""Grain pipelines: the training iterator (shuffled, sharded per host, checkpointable) and the
fixed evaluation batches."""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np
from absl import flags

from gdn2_jax.config import DataConfig
from gdn2_jax.data import packed, recall, token_files
from gdn2_jax.data.errors import DataError

TRAIN_SPLIT, EVAL_SPLIT = 0, 1


@dataclasses.dataclass(frozen=True)
class Sources:
    train: object
    eval: object
    # Tokens the data can contain (None when unknown without reading every token).
    vocab_size: int | None
    # kind="tokens": the checked token files (what `check_vocab` reports offsets in).
    tokens: token_files.TokenData | None = None


def make_sources(cfg: DataConfig) -> Sources:
    if cfg.kind == "recall":
        return Sources(
            recall.RecallSource(cfg.recall, cfg.seq_len, cfg.seed, TRAIN_SPLIT),
            recall.RecallSource(cfg.recall, cfg.seq_len, cfg.seed, EVAL_SPLIT),
            cfg.recall.vocab_size,
        )
    if cfg.kind == "tokens":
        return _token_sources(cfg)
    eos = packed.BYTE_EOS
    train = packed.PackedWindows([packed.byte_stream(cfg.paths, cfg.jsonl_field)], cfg.seq_len, eos)
    if cfg.eval_paths:
        held = [packed.byte_stream(cfg.eval_paths, cfg.jsonl_field)]
        return Sources(train, packed.PackedWindows(held, cfg.seq_len, eos), packed.BYTE_VOCAB_SIZE)
    return _split_tail(train, cfg.eval_fraction, packed.BYTE_VOCAB_SIZE)


def _token_sources(cfg: DataConfig) -> Sources:
    data = token_files.load(cfg.paths, cfg.eval_paths, cfg.token_dtype, cfg.eos_id)
    train = packed.PackedWindows([f.tokens for f in data.train], cfg.seq_len, data.eos_id)
    if not data.eval:
        return dataclasses.replace(
            _split_tail(train, cfg.eval_fraction, data.vocab_size), tokens=data
        )
    held = packed.PackedWindows([f.tokens for f in data.eval], cfg.seq_len, data.eos_id)
    return Sources(train, held, data.vocab_size, data)


def check_vocab(sources: Sources, model_vocab_size: int) -> None:
    """Every id the data holds is one the model embeds; token files name the file and offset."""
    if sources.tokens is not None:
        token_files.check_model_vocab(sources.tokens, model_vocab_size)
    elif sources.vocab_size is not None and sources.vocab_size > model_vocab_size:
        raise DataError(
            f"the data uses {sources.vocab_size} token ids but model.vocab_size={model_vocab_size}"
        )


def _split_tail(windows, fraction: float, vocab: int | None) -> Sources:
    """Holds out the last windows for eval, so that no eval window is trained on."""
    n = len(windows)
    num_eval = max(1, math.ceil(n * fraction))
    if num_eval >= n:
        raise DataError(f"only {n} windows: too few to hold out {fraction:.1%} for eval")
    ds = grain.MapDataset.source(windows)
    return Sources(ds[: n - num_eval], ds[n - num_eval :], vocab)


def local_batch_size(cfg: DataConfig, process_count: int) -> int:
    if cfg.batch_size % process_count:
        raise ValueError(
            f"data.batch_size={cfg.batch_size} must divide evenly over {process_count} processes"
        )
    return cfg.batch_size // process_count


def _examples(source, cfg: DataConfig, *, shuffle: bool) -> grain.MapDataset:
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if len(ds) < recall.NUM_EXAMPLES:
        # Epochs repeat forever, each in a fresh shuffled order.
        ds = ds.repeat()
    return ds


def _batched(source, cfg: DataConfig, *, shuffle: bool, process_index: int, process_count: int):
    ds = _examples(source, cfg, shuffle=shuffle)[process_index::process_count]
    return ds.batch(local_batch_size(cfg, process_count), drop_remainder=True)


def make_train_iterator(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1):
    """An endless iterator of this host's share of each global batch. Its `get_state()` /
    `set_state()` are what checkpoints store, so a resumed run sees the same batches.

    Grain's `ElasticIterator` keeps the position as one global example index, the same for any
    number of worker processes: a run resumes with another `num_workers`. Host p reads examples
    p, p + P, ... of each global batch, as `eval_batches` does."""
    source = make_sources(cfg).train
    # Grain would say it only at the first batch, without naming the config key.
    local_batch_size(cfg, process_count)
    # Recall examples are independent draws already; shuffling them would change nothing.
    shuffle = cfg.shuffle and cfg.kind != "recall"
    read = grain.ReadOptions(num_threads=cfg.prefetch, prefetch_buffer_size=cfg.prefetch)
    workers = None
    if cfg.num_workers:
        allow_worker_processes()
        workers = grain.MultiprocessingOptions(num_workers=cfg.num_workers)
    elastic = grain.experimental.ElasticIterator(
        _examples(source, cfg, shuffle=shuffle),
        cfg.batch_size,
        grain.sharding.ShardOptions(process_index, process_count),
        read_options=read,
        multiprocessing_options=workers,
    )
    return iter(elastic)


def allow_worker_processes() -> None:
    """Grain's worker processes read absl flags, which only an absl app has parsed
    (google/grain#1355); outside one, accept the flag defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def in_workers(it_ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """`it_ds` prefetched by `num_workers` grain worker processes (unchanged for 0)."""
    if num_workers == 0:
        return it_ds
    allow_worker_processes()
    return it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def eval_batches(
    cfg: DataConfig, num_batches: int, *, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
    """The same `num_batches` held-out batches every time (eval data wraps if it is short)."""
    source = make_sources(cfg).eval
    ds = _batched(
        source, cfg, shuffle=False, process_index=process_index, process_count=process_count
    )
    return [ds[i] for i in range(num_batches)]
