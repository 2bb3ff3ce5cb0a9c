"""NIAH prompts: exact lengths, the asked needle really is in the haystack (and only once),
distractors have other keys, and impossible settings raise."""

import numpy as np
import pytest

from gdn2_jax import niah
from gdn2_jax.config import RecallConfig
from gdn2_jax.data import recall


@pytest.mark.parametrize("task", niah.TASKS)
@pytest.mark.parametrize("length", [700, 1500])
def test_byte_prompts(task, length):
    fmt = niah.ByteFormat()
    s = fmt.sample(task, length, np.random.default_rng(3))
    assert s.prompt.shape == (length,) and s.prompt.dtype == np.int32
    text, answer = fmt.decode(s.prompt), fmt.decode(s.answer)
    key = text.rsplit(" for ", 1)[1].split(" mentioned")[0]
    needle = f"for {key} is:{answer}."
    assert text.count(needle) == 1, (needle, text)
    assert text.endswith("mentioned in the provided text is")
    needles = text.count("One of the special magic")
    assert needles == (niah.MK_NEEDLES if task == "mk_niah_1" else 1)
    if task == "s_niah_1":
        assert niah.NOISE.split(".")[0] in text
    if task == "s_niah_3":
        assert [len(p) for p in answer.strip().split("-")] == [8, 4, 4, 4, 12]
    else:
        assert answer.strip().isdigit() and len(answer.strip()) == 7


@pytest.mark.parametrize("variant", ["mqar", "needle"])
@pytest.mark.parametrize("task", niah.TASKS)
def test_recall_prompts(variant, task):
    cfg = RecallConfig(variant=variant, vocab_size=64, num_pairs=4, num_queries=4)
    layout = recall.vocab_layout(cfg)
    fmt = niah.RecallFormat(cfg)
    for i in range(5):
        s = fmt.sample(task, 40, np.random.default_rng(i))
        assert s.prompt.shape == (40,)
        key, hay = s.prompt[-1], s.prompt[:-1]
        at = np.flatnonzero(hay == key)
        assert len(at) == 1
        np.testing.assert_array_equal(hay[at[0] + 1 : at[0] + 1 + len(s.answer)], s.answer)
        assert np.all((s.answer >= layout.values[0]) & (s.answer < layout.values[1]))
        keys = hay[(hay >= layout.keys[0]) & (hay < layout.keys[1])]
        assert len(set(keys.tolist())) == len(keys) == (4 if task == "mk_niah_1" else 1)
        if layout.filler[1] <= layout.filler[0]:
            assert np.sum(hay == recall.PAD) == len(hay) - len(keys) * (1 + len(s.answer))


def test_samples_are_deterministic_and_scored_exactly():
    fmt = niah.RecallFormat(RecallConfig(vocab_size=64, num_pairs=4, num_queries=4))
    a = niah.samples(fmt, niah.TASKS, 32, 3, seed=1)
    b = niah.samples(fmt, niah.TASKS, 32, 3, seed=1)
    assert [s.task for s in a] == [t for t in niah.TASKS for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.prompt, y.prompt)
    s = a[-4]  # an s_niah_3 sample: a 4-token answer
    assert niah.exact_match(s, np.r_[s.answer, 7])
    assert not niah.exact_match(s, np.r_[s.answer[:-1], s.answer[-1] + 1])
    assert not niah.exact_match(s, s.answer[:-1])


def test_too_short_or_unknown_raises():
    with pytest.raises(ValueError, match="length 100 is too short for s_niah_1"):
        niah.ByteFormat().sample("s_niah_1", 100, np.random.default_rng(0))
    with pytest.raises(ValueError, match="task must be one of"):
        niah.ByteFormat().sample("s_niah_9", 1000, np.random.default_rng(0))
    with pytest.raises(ValueError, match="length 6 is too short for mk_niah_1"):
        niah.RecallFormat(RecallConfig()).sample("mk_niah_1", 6, np.random.default_rng(0))
