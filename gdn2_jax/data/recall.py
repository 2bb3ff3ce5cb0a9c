"""Synthetic associative recall, generated from (seed, index) so any example can be rebuilt.

Sequences hold key-value pairs and later queries: a query is a key, and the token after it must
be that key's value. Only those answer positions carry loss, so the task measures recall alone.
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
    if cfg.variant == "mqar":
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
    if 2 * cfg.num_pairs + 2 * cfg.num_queries > seq_len + 1:
        raise ValueError(
            f"data.seq_len={seq_len} is too short for {cfg.num_pairs} pairs and "
            f"{cfg.num_queries} queries (needs {2 * cfg.num_pairs + 2 * cfg.num_queries - 1})"
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
        make = _mqar if self.cfg.variant == "mqar" else _needle
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


def _mqar(cfg: RecallConfig, layout: VocabLayout, length: int, rng: np.random.Generator):
    """k1 v1 ... kP vP, then query-answer pairs at random 2-token slots among PAD tokens."""
    keys, values, asked = _pairs(cfg, layout, rng)
    seq = np.full(length, PAD, np.int64)
    answer = np.zeros(length, bool)
    seq[0 : 2 * cfg.num_pairs : 2] = keys
    seq[1 : 2 * cfg.num_pairs : 2] = values
    num_slots = (length - 2 * cfg.num_pairs) // 2
    slots = np.sort(rng.choice(num_slots, size=cfg.num_queries, replace=False))
    starts = 2 * cfg.num_pairs + 2 * slots
    seq[starts], seq[starts + 1] = keys[asked], values[asked]
    answer[starts + 1] = True
    return seq, answer


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
