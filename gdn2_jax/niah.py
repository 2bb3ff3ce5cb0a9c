"""RULER-style needle-in-a-haystack prompts, rendered for a model's vocabulary.

Tasks (RULER's names): "s_niah_1" one numeric passkey in a haystack of repeated noise,
"s_niah_2" one 7-digit number in a filler haystack, "s_niah_3" one UUID-like value in a filler
haystack, "mk_niah_1" several keyed numeric needles in a filler haystack with one of them asked
(the others are distractors). Every prompt is exactly the requested number of tokens and ends
where the answer starts; the answer is scored by exact match of the greedy continuation.

Two vocabularies ("tokenizer stories"):

- `ByteFormat`, models trained on byte-level text (`data.kind="text"`): one token per UTF-8
  byte. RULER's English templates; the noise is RULER's "The grass is green. The sky is blue.
  ..." repeated; the filler is generated, not downloaded: sentences drawn from a fixed word list
  (`FILLER_WORDS`) with a seeded generator. Keys are adjective-noun word pairs.
- `RecallFormat`, models trained on synthetic recall (`data.kind="recall"`): the recall task's
  own token ranges. A needle is a key token followed by its value token(s) (four for the
  UUID-like value); the prompt ends with the asked key. Noise is a repeated 4-token filler
  pattern and filler is random filler tokens; a vocabulary without a filler range (the "mqar"
  and "overwrite" variants) uses PAD for both, as those models saw PAD between their queries.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gdn2_jax.config import RecallConfig
from gdn2_jax.data import recall as recall_lib

TASKS = ("s_niah_1", "s_niah_2", "s_niah_3", "mk_niah_1")
# Needles in "mk_niah_1": one asked, the rest distractors (RULER's MK-NIAH-1 uses 4).
MK_NEEDLES = 4

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLER_WORDS = {
    "subject": ("the old city", "a quiet river", "the engineer", "every winter", "the market",
                "a long letter", "the small boat", "our neighbour", "the north road", "a garden"),
    "verb": ("remembers", "crosses", "follows", "changes", "carries", "watches", "builds",
             "waits for", "describes", "opens"),
    "object": ("the morning light", "a distant hill", "the stone bridge", "an empty room",
               "the last train", "a wooden table", "the harbour", "a paper map",
               "the evening bell", "a narrow street"),
}  # fmt: skip
KEY_WORDS = (
    ("amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly"),
    ("apple", "badger", "canyon", "dragon", "ember", "falcon", "glacier", "harbor", "island"),
)


@dataclasses.dataclass(frozen=True)
class Sample:
    """prompt [length] int32 tokens and the answer [A] int32 that must follow it."""

    task: str
    length: int
    prompt: np.ndarray
    answer: np.ndarray


def _check(task: str, length: int, minimum: int) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if length < minimum:
        raise ValueError(f"length {length} is too short for {task}: needs at least {minimum}")


class ByteFormat:
    """Prompts as UTF-8 bytes (token = byte value) in RULER's templates."""

    def _key(self, rng) -> str:
        return f"{rng.choice(KEY_WORDS[0])}-{rng.choice(KEY_WORDS[1])}"

    def _value(self, task: str, rng) -> str:
        if task == "s_niah_3":
            return "-".join(bytes(rng.integers(256, size=n, dtype=np.uint8)).hex() for n in
                            (4, 2, 2, 2, 6))  # fmt: skip
        return str(rng.integers(1_000_000, 10_000_000))

    def _haystack(self, task: str, num_bytes: int, rng) -> list[str]:
        """Sentences whose joined length reaches `num_bytes`."""
        sentences, total = [], 0
        while total < num_bytes:
            if task == "s_niah_1":
                s = NOISE
            else:
                s = " ".join(str(rng.choice(FILLER_WORDS[p])) for p in FILLER_WORDS)
                s = s[0].upper() + s[1:] + "."
            sentences.append(s)
            total += len(s) + 1
        return sentences

    def sample(self, task: str, length: int, rng: np.random.Generator) -> Sample:
        kind = "UUIDs" if task == "s_niah_3" else "numbers"
        count = MK_NEEDLES if task == "mk_niah_1" else 1
        keys = list(dict.fromkeys(self._key(rng) for _ in range(8 * count)))[:count]
        values = [self._value(task, rng) for _ in keys]
        asked = int(rng.integers(len(keys)))
        head = (
            f"Some special magic {kind} are hidden within the following text. Make sure to "
            f"memorize it. I will quiz you about the {kind} afterwards.\n"
        )
        tail = (
            f"\nWhat is the special magic {kind[:-1]} for {keys[asked]} mentioned in the provided"
            f" text? The special magic {kind[:-1]} for {keys[asked]} mentioned in the provided "
            "text is"
        )
        needles = [
            f"One of the special magic {kind} for {k} is: {v}. "
            for k, v in zip(keys, values, strict=True)
        ]
        fixed = len(head) + len(tail) + sum(map(len, needles))
        _check(task, length, fixed + 1)
        filler = " ".join(self._haystack(task, length - fixed, rng))[: length - fixed]
        # Needles go in at sentence starts (or the very end), RULER's depths.
        starts = [0, *(i + 2 for i in range(len(filler) - 1) if filler[i : i + 2] == ". ")]
        where = sorted(rng.choice([*starts, len(filler)], size=len(needles)), reverse=True)
        for pos, needle in zip(where, needles, strict=True):
            filler = filler[:pos] + needle + filler[pos:]
        prompt = np.frombuffer((head + filler + tail).encode(), np.uint8).astype(np.int32)
        answer = np.frombuffer(f" {values[asked]}".encode(), np.uint8).astype(np.int32)
        return Sample(task, length, prompt, answer)

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


class RecallFormat:
    """Prompts in a recall-trained model's vocabulary (`gdn2_jax.data.recall`'s layout)."""

    UUID_TOKENS = 4

    def __init__(self, cfg: RecallConfig):
        self.layout = recall_lib.vocab_layout(cfg)

    def _haystack(self, task: str, n: int, rng) -> np.ndarray:
        lo, hi = self.layout.filler
        if hi <= lo:
            return np.full(n, recall_lib.PAD, np.int64)
        if task == "s_niah_1":
            pattern = lo + np.arange(4) % (hi - lo)
            return np.resize(pattern, n)
        return rng.integers(lo, hi, size=n)

    def sample(self, task: str, length: int, rng: np.random.Generator) -> Sample:
        count = MK_NEEDLES if task == "mk_niah_1" else 1
        width = self.UUID_TOKENS if task == "s_niah_3" else 1
        num_keys = self.layout.keys[1] - self.layout.keys[0]
        if count > num_keys:
            raise ValueError(f"{task} needs {count} distinct keys; the vocabulary has {num_keys}")
        keys = rng.choice(np.arange(*self.layout.keys), size=count, replace=False)
        values = rng.integers(*self.layout.values, size=(count, width))
        asked = int(rng.integers(count))
        hay_len = length - 1
        _check(task, length, count * (1 + width) + 1)
        seq = self._haystack(task, hay_len, rng).astype(np.int64)
        # Needles at distinct aligned slots, so none overwrites another.
        slots = rng.choice(hay_len // (1 + width), size=count, replace=False) * (1 + width)
        for slot, key, value in zip(slots, keys, values, strict=True):
            seq[slot], seq[slot + 1 : slot + 1 + width] = key, value
        prompt = np.concatenate([seq, [keys[asked]]]).astype(np.int32)
        return Sample(task, length, prompt, values[asked].astype(np.int32))

    def decode(self, tokens) -> str:
        return " ".join(str(int(t)) for t in tokens)


def samples(fmt, tasks, length: int, num: int, seed: int) -> list[Sample]:
    """`num` samples of each task at `length`, the same for the same seed."""
    return [
        fmt.sample(task, length, np.random.default_rng([seed, length, t, i]))
        for t, task in enumerate(tasks)
        for i in range(num)
    ]


def exact_match(sample: Sample, generated) -> bool:
    """Whether the first len(answer) generated tokens are the answer."""
    generated = np.asarray(generated)[: len(sample.answer)]
    return len(generated) == len(sample.answer) and bool(np.all(generated == sample.answer))
