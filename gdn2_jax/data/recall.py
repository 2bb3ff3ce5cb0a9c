"""Synthetic associative recall, generated from (seed, index) so any example can be rebuilt.

Sequences hold key-value pairs and later queries: a query is a key, and the token after it must
be that key's value (its latest one, where keys are written more than once). Only those answer
positions carry loss, so the task measures recall alone. The knobs that load a fixed-size state:
`num_pairs` (pairs per state dimension), `num_overwrites` and the haystack length (`seq_len`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gdn2_jax.config import RecallConfig

PAD = 0
# Examples are indexed, not enumerated; this length means "never runs out".
NUM_EXAMPLES = 2**40


@dataclasses.dataclass(frozen=True)
class VocabLayout:
    """Disjoint token ranges: PAD, then keys, values and (for the needle haystack) filler."""

    keys: tuple[int, int]
    values: tuple[int, int]
    filler: tuple[int, int]


def vocab_layout(cfg: RecallConfig) -> VocabLayout:
    usable = cfg.vocab_size - 1
    if cfg.variant in ("mqar", "overwrite"):
        n = usable // 2
        return VocabLayout((1, 1 + n), (1 + n, 1 + 2 * n), (1 + 2 * n, 1 + 2 * n))
    n = usable // 4
    return VocabLayout((1, 1 + n), (1 + n, 1 + 2 * n), (1 + 2 * n, cfg.vocab_size))


def validate(cfg: RecallConfig, seq_len: int) -> None:
    layout = vocab_layout(cfg)
    num_keys = layout.keys[1] - layout.keys[0]
    if cfg.num_pairs > num_keys:
        raise ValueError(
            f"data.recall.num_pairs={cfg.num_pairs} needs that many distinct keys, but "
            f"vocab_size={cfg.vocab_size} leaves {num_keys} for the {cfg.variant} variant"
        )
    if not 1 <= cfg.num_queries <= cfg.num_pairs:
        raise ValueError(
            f"data.recall.num_queries={cfg.num_queries} must be in [1, num_pairs={cfg.num_pairs}]"
        )
    if cfg.num_overwrites < 0 or (cfg.num_overwrites and cfg.variant != "overwrite"):
        raise ValueError(
            f"data.recall.num_overwrites={cfg.num_overwrites} must be >= 0, and 0 unless "
            f'variant="overwrite" (got variant={cfg.variant!r})'
        )
    if cfg.variant == "overwrite" and layout.values[1] - layout.values[0] < 2:
        raise ValueError(
            f"data.recall.vocab_size={cfg.vocab_size} leaves fewer than 2 values to overwrite with"
        )
    writes = cfg.num_pairs + cfg.num_overwrites
    if 2 * writes + 2 * cfg.num_queries > seq_len + 1:
        raise ValueError(
            f"data.seq_len={seq_len} is too short for {writes} key-value writes and "
            f"{cfg.num_queries} queries (needs {2 * writes + 2 * cfg.num_queries - 1})"
        )


class RecallSource:
    """A grain random-access source: `source[i]` is example i of the split, always the same."""

    def __init__(self, cfg: RecallConfig, seq_len: int, seed: int, split: int):
        validate(cfg, seq_len)
        self.cfg, self.seq_len, self.seed, self.split = cfg, seq_len, seed, split
        self.layout = vocab_layout(cfg)

    def __len__(self) -> int:
        return NUM_EXAMPLES

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split, int(index)])
        make = {"mqar": _mqar, "needle": _needle, "overwrite": _overwrite}[self.cfg.variant]
        seq, answer = make(self.cfg, self.layout, self.seq_len + 1, rng)
        return {
            "inputs": seq[:-1].astype(np.int32),
            "targets": seq[1:].astype(np.int32),
            "loss_mask": answer[1:].astype(np.float32),
        }


def _pairs(cfg: RecallConfig, layout: VocabLayout, rng: np.random.Generator):
    keys = rng.choice(np.arange(*layout.keys), size=cfg.num_pairs, replace=False)
    values = rng.integers(*layout.values, size=cfg.num_pairs)
    asked = rng.choice(cfg.num_pairs, size=cfg.num_queries, replace=False)
    return keys, values, asked


def _writes_then_queries(written_keys, written_values, query_keys, query_values, length, rng):
    """k1 v1 k2 v2 ..., then query-answer pairs at random 2-token slots among PAD tokens."""
    seq = np.full(length, PAD, np.int64)
    answer = np.zeros(length, bool)
    end = 2 * len(written_keys)
    seq[0:end:2], seq[1:end:2] = written_keys, written_values
    num_slots = (length - end) // 2
    slots = np.sort(rng.choice(num_slots, size=len(query_keys), replace=False))
    starts = end + 2 * slots
    seq[starts], seq[starts + 1] = query_keys, query_values
    answer[starts + 1] = True
    return seq, answer


def _mqar(cfg: RecallConfig, layout: VocabLayout, length: int, rng: np.random.Generator):
    keys, values, asked = _pairs(cfg, layout, rng)
    return _writes_then_queries(keys, values, keys[asked], values[asked], length, rng)


def _value_chains(slots: np.ndarray, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """A value in [lo, hi) for each write to `slots[i]`, each differing from that slot's
    previous value: a random start, then steps of 1 .. n-1 modulo the range size n."""
    n = hi - lo
    by_slot = np.argsort(slots, kind="stable")
    sorted_slots = slots[by_slot]
    head = np.r_[True, sorted_slots[1:] != sorted_slots[:-1]]
    steps = np.where(head, rng.integers(n, size=len(slots)), rng.integers(1, n, size=len(slots)))
    total = np.cumsum(steps)
    start = np.maximum.accumulate(np.where(head, np.arange(len(slots)), 0))
    values = np.empty(len(slots), np.int64)
    values[by_slot] = lo + (total - total[start] + steps[start]) % n
    return values


def _overwrite(cfg: RecallConfig, layout: VocabLayout, length: int, rng: np.random.Generator):
    """Every key written once, plus `num_overwrites` re-writes of random keys, shuffled; each
    re-write changes the key's value. Queries ask re-written keys first, the latest value wins."""
    keys = rng.choice(np.arange(*layout.keys), size=cfg.num_pairs, replace=False)
    order = rng.permutation(
        np.concatenate(
            [np.arange(cfg.num_pairs), rng.integers(cfg.num_pairs, size=cfg.num_overwrites)]
        )
    )
    values = _value_chains(order, *layout.values, rng)
    # Every slot occurs, so the unique slots of the reversed order are 0 .. P-1.
    last_write = len(order) - 1 - np.unique(order[::-1], return_index=True)[1]
    latest = values[last_write]
    writes = np.bincount(order, minlength=cfg.num_pairs)
    rewritten, others = np.flatnonzero(writes > 1), np.flatnonzero(writes == 1)
    asked = np.concatenate([rng.permutation(rewritten), rng.permutation(others)])
    asked = asked[: cfg.num_queries]
    return _writes_then_queries(keys[order], values, keys[asked], latest[asked], length, rng)


def _needle(cfg: RecallConfig, layout: VocabLayout, length: int, rng: np.random.Generator):
    """Filler haystack with P key-value needles at random places; the last 2Q tokens ask Q keys."""
    keys, values, asked = _pairs(cfg, layout, rng)
    hay_len = length - 2 * cfg.num_queries
    seq = np.empty(length, np.int64)
    seq[:hay_len] = rng.integers(*layout.filler, size=hay_len)
    answer = np.zeros(length, bool)
    # Needles sit at distinct 2-token slots so that no needle overwrites another.
    slots = np.sort(rng.choice(hay_len // 2, size=cfg.num_pairs, replace=False))
    seq[2 * slots], seq[2 * slots + 1] = keys, values
    q_starts = hay_len + 2 * np.arange(cfg.num_queries)
    seq[q_starts], seq[q_starts + 1] = keys[asked], values[asked]
    answer[q_starts + 1] = True
    return seq, answer
