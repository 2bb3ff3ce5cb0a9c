"""Input pipelines: the recall task's answers are right, packing marks documents, and the
iterator is deterministic, shardable across hosts and resumable from its saved state."""

import dataclasses
import json

import numpy as np
import pytest

from gdn2_jax import data
from gdn2_jax.config import DataConfig, RecallConfig
from gdn2_jax.data import packed, recall, token_files


def _check_answers(example, cfg: RecallConfig):
    """Every loss position's target is the value that followed the same key earlier on."""
    seq = np.concatenate([example["inputs"], example["targets"][-1:]])
    layout = recall.vocab_layout(cfg)
    answers = np.flatnonzero(example["loss_mask"]) + 1
    assert len(answers) == cfg.num_queries
    for pos in answers:
        key = seq[pos - 1]
        assert layout.keys[0] <= key < layout.keys[1]
        first = np.flatnonzero(seq[: pos - 1] == key)[0]
        assert seq[first + 1] == seq[pos]
        assert layout.values[0] <= seq[pos] < layout.values[1]


@pytest.mark.parametrize("variant", ["mqar", "needle"])
def test_recall_answers_and_determinism(variant):
    cfg = RecallConfig(variant=variant, vocab_size=64, num_pairs=6, num_queries=4)
    src = recall.RecallSource(cfg, seq_len=48, seed=3, split=0)
    for i in range(20):
        _check_answers(src[i], cfg)
    np.testing.assert_array_equal(src[5]["inputs"], src[5]["inputs"])
    again = recall.RecallSource(cfg, seq_len=48, seed=3, split=0)
    np.testing.assert_array_equal(src[7]["inputs"], again[7]["inputs"])
    other = recall.RecallSource(cfg, seq_len=48, seed=3, split=1)
    assert not np.array_equal(src[7]["inputs"], other[7]["inputs"])
    assert src[0]["inputs"].shape == (48,) and src[0]["inputs"].dtype == np.int32


def test_overwrite_asks_for_the_latest_value():
    cfg = RecallConfig(
        variant="overwrite", vocab_size=64, num_pairs=6, num_queries=4, num_overwrites=10
    )
    src = recall.RecallSource(cfg, seq_len=48, seed=1, split=0)
    layout = recall.vocab_layout(cfg)
    writes = cfg.num_pairs + cfg.num_overwrites
    stale = 0
    for i in range(20):
        ex = src[i]
        seq = np.concatenate([ex["inputs"], ex["targets"][-1:]])
        written = seq[: 2 * writes : 2]
        assert len(set(written.tolist())) == cfg.num_pairs
        answers = np.flatnonzero(ex["loss_mask"]) + 1
        assert len(answers) == cfg.num_queries
        for pos in answers:
            occurrences = np.flatnonzero(written == seq[pos - 1])
            assert seq[pos] == seq[2 * occurrences[-1] + 1]
            assert layout.values[0] <= seq[pos] < layout.values[1]
            # A re-write always changes the value, so the first one is stale when re-written.
            stale += len(occurrences) > 1 and seq[2 * occurrences[0] + 1] != seq[pos]
    # 10 re-writes over 6 keys: most queries must be about a re-written key.
    assert stale >= 0.7 * 20 * cfg.num_queries


def test_needle_keys_are_unique_in_haystack():
    cfg = RecallConfig(variant="needle", vocab_size=64, num_pairs=5, num_queries=2)
    src = recall.RecallSource(cfg, seq_len=100, seed=0, split=0)
    layout = recall.vocab_layout(cfg)
    seq = src[1]["inputs"][: 100 + 1 - 2 * cfg.num_queries]
    keys = seq[(seq >= layout.keys[0]) & (seq < layout.keys[1])]
    assert len(keys) == cfg.num_pairs == len(set(keys.tolist()))


@pytest.mark.parametrize(
    "cfg,seq_len,match",
    [
        (RecallConfig(vocab_size=16, num_pairs=10), 64, "distinct keys"),
        (RecallConfig(num_pairs=4, num_queries=5), 64, "num_queries"),
        (RecallConfig(num_pairs=16, num_queries=16), 32, "too short"),
        (
            RecallConfig(variant="overwrite", num_pairs=8, num_queries=8, num_overwrites=12),
            48,
            "too short",
        ),
        (RecallConfig(num_pairs=4, num_queries=4, num_overwrites=2), 64, "num_overwrites"),
    ],
)
def test_recall_rejects_impossible_settings(cfg, seq_len, match):
    with pytest.raises(ValueError, match=match):
        recall.RecallSource(cfg, seq_len, seed=0, split=0)


def test_recall_config_rejects_negative_overwrites():
    with pytest.raises(ValueError, match="num_overwrites must be >= 0"):
        RecallConfig(variant="overwrite", num_pairs=4, num_queries=4, num_overwrites=-1)


def test_pack_window_segments_and_mask():
    eos = 0
    window = np.array([5, 6, eos, 7, 8, 9, eos, eos, 4])
    ex = packed.pack_window(window, eos)
    np.testing.assert_array_equal(ex["inputs"], window[:-1])
    np.testing.assert_array_equal(ex["targets"], window[1:])
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3])
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 0, 1, 1, 1, 0, 0])


def test_byte_text_from_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("héllo")
    lines = [json.dumps({"text": "ab"}), "", json.dumps({"text": "c"})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    stream = packed.byte_stream([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    expected = [*"héllo".encode(), 256, *b"ab", 256, *b"c", 256]
    np.testing.assert_array_equal(stream, expected)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match="no field 'text'"):
        packed.byte_stream([str(tmp_path / "bad.jsonl")])


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_files_pack_every_token_once(tmp_path, suffix):
    tokens = np.arange(1, 1001, dtype=np.uint16)
    tokens[::37] = 0
    path = tmp_path / f"toks{suffix}"
    np.save(path, tokens) if suffix == ".npy" else tokens.tofile(path)
    files = token_files.load([str(path)], (), "uint16", eos_id=0)
    windows = packed.PackedWindows([f.tokens for f in files.train], 16, eos_id=0)
    assert len(windows) == (1000 - 1) // 16
    targets = np.concatenate([windows[i]["targets"] for i in range(len(windows))])
    np.testing.assert_array_equal(targets, tokens[1 : 1 + len(targets)])


def _text_cfg(tmp_path, **kw) -> DataConfig:
    docs = [{"text": f"document number {i} " * (i % 5 + 1)} for i in range(200)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    return DataConfig(kind="text", seq_len=32, batch_size=4, paths=(str(path),), **kw)


def test_eval_split_is_held_out(tmp_path):
    cfg = _text_cfg(tmp_path, eval_fraction=0.1)
    sources = data.make_sources(cfg)
    n_train, n_eval = len(sources.train), len(sources.eval)
    train_rows = {sources.train[i]["inputs"].tobytes() for i in range(n_train)}
    assert n_eval >= 1 and not any(
        sources.eval[i]["inputs"].tobytes() in train_rows for i in range(n_eval)
    )
    batches = data.eval_batches(cfg, 3)
    assert len(batches) == 3 and batches[0]["segment_ids"].shape == (4, 32)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_iterator_state_resumes_exactly(tmp_path):
    cfg = _text_cfg(tmp_path)
    it = data.make_train_iterator(cfg)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 40)  # crosses an epoch boundary
    fresh = data.make_train_iterator(cfg)
    fresh.set_state(state)
    for a, b in zip(expected, _take(fresh, 40), strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_epochs_are_reshuffled(tmp_path):
    cfg = _text_cfg(tmp_path)
    n = len(data.make_sources(cfg).train) // cfg.batch_size
    batches = _take(data.make_train_iterator(cfg), 2 * n)
    first = np.concatenate([b["inputs"] for b in batches[:n]])
    second = np.concatenate([b["inputs"] for b in batches[n:]])
    assert not np.array_equal(first, second)
    same_rows = sorted(r.tobytes() for r in first) == sorted(r.tobytes() for r in second)
    assert same_rows


def test_hosts_share_the_global_batch():
    cfg = DataConfig(batch_size=8, seq_len=32, recall=RecallConfig(num_pairs=4, num_queries=4))
    whole = np.concatenate([b["inputs"] for b in _take(data.make_train_iterator(cfg), 2)])
    parts = [
        np.concatenate(
            [
                b["inputs"]
                for b in _take(data.make_train_iterator(cfg, process_index=p, process_count=2), 2)
            ]
        )
        for p in range(2)
    ]
    assert all(p.shape == (8, 32) for p in parts)
    assert sorted(r.tobytes() for r in whole) == sorted(r.tobytes() for p in parts for r in p)
    with pytest.raises(ValueError, match="divide evenly"):
        data.make_train_iterator(dataclasses.replace(cfg, batch_size=7), process_count=2)


def test_worker_processes_match_in_process(tmp_path):
    cfg = _text_cfg(tmp_path)
    reference = _take(data.make_train_iterator(cfg), 6)
    workers = dataclasses.replace(cfg, num_workers=2)
    it = data.make_train_iterator(workers)
    got = _take(it, 4)
    state = it.get_state()
    for a, b in zip(reference[:4], got, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    resumed = data.make_train_iterator(workers)
    resumed.set_state(state)
    for a, b in zip(reference[4:], _take(resumed, 2), strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
