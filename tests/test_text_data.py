"""Real text end to end: `gdn2_jax.data.prepare` with a tokenizer.json (a tiny BPE trained by
`tokenizers`) and a SentencePiece .model on text the test writes in every supported format,
then train.py on the prepared folder and `evaluate --suite ppl` on its held-out split."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import text_testing
from train_testing import tiny_config

from gdn2_jax import data, evaluate, trainer
from gdn2_jax.data import DataError, prepare, token_files
from gdn2_jax.data.tokenizer import file_sha256, load_tokenizer

MAKERS = {
    "bpe": ("tok.json", text_testing.bpe),
    "sentencepiece": ("sp.model", text_testing.sentencepiece_model),
}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def prepared(request, tmp_path_factory):
    """(corpus parts, tokenizer path, prepared folder, metadata) for each tokenizer kind."""
    root = tmp_path_factory.mktemp(request.param)
    parts = text_testing.write_corpus(root / "corpus")
    name, make = MAKERS[request.param]
    tok = make(root / name)
    meta = prepare.prepare(str(root / "corpus"), str(tok), root / "out", eval_fraction=0.2,
                           progress=False)  # fmt: skip
    return parts, tok, root / "out", meta


def _docs(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eos)
    assert len(tokens) == 0 or ends[-1] == len(tokens) - 1, "a shard ends a document"
    return np.split(tokens, ends + 1)[:-1]


def test_prepare_round_trips_every_document_exactly(prepared):
    """Both tokenizers guarantee decode(encode(text)) == text for this text (byte-level BPE;
    SentencePiece with byte fallback and no normalization), so every document of every input
    format comes back from the shards, in order, in the split its hash assigns it."""
    parts, tok_path, out, meta = prepared
    tok = load_tokenizer(tok_path)
    eos = meta["eos_id"]
    assert meta["tokenizer"]["sha256"] == file_sha256(tok_path) and eos == tok.info.eos_id
    for i, (name, texts) in enumerate(sorted(parts.items())):
        split_of = [
            "eval" if prepare.held_out(name, j, 0.2) else "train" for j in range(len(texts))
        ]
        for split in ("train", "eval"):
            path = out / f"{split}-{i:05d}.bin"
            got = [
                tok.decode(d[:-1].tolist()) for d in _docs(np.fromfile(path, meta["dtype"]), eos)
            ]
            assert got == [t for t, s in zip(texts, split_of, strict=True) if s == split]
    for split in ("train", "eval"):
        s = meta["splits"][split]
        texts = [t for i, (n, ts) in enumerate(sorted(parts.items())) for j, t in enumerate(ts)
                 if prepare.held_out(n, j, 0.2) == (split == "eval")]  # fmt: skip
        assert s["documents"] == len(texts) > 0
        assert s["bytes"] == sum(len(t.encode()) for t in texts)
        assert s["tokens"] == sum(len(x) + 1 for x in tok.encode_batch(texts))


def test_prepare_resumes_per_shard_and_workers_agree(tmp_path):
    parts = text_testing.write_corpus(tmp_path / "corpus", n=60)
    tok = text_testing.bpe(tmp_path / "tok.json")
    out = tmp_path / "out"
    prepare.prepare(str(tmp_path / "corpus"), str(tok), out, eval_fraction=0.2, progress=False)
    shards = sorted(out.glob("*.bin"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    (out / "shard-00001.json").unlink()  # as if stopped before shard 1 finished
    with (tmp_path / "corpus" / "a.jsonl").open("a") as f:  # a source that changed
        f.write(json.dumps({"text": "one more document"}) + "\n")
    again = prepare.prepare(str(tmp_path / "corpus"), str(tok), out, eval_fraction=0.2,
                            progress=False)  # fmt: skip
    rewritten = {p.name for p in shards if p.stat().st_mtime_ns != stamps[p]}
    assert rewritten == {"train-00000.bin", "eval-00000.bin", "train-00001.bin", "eval-00001.bin"}
    assert (
        sum(s["documents"] for s in again["splits"].values()) == sum(map(len, parts.values())) + 1
    )
    parallel = tmp_path / "parallel"
    prepare.prepare(str(tmp_path / "corpus"), str(tok), parallel, eval_fraction=0.2, workers=2,
                    progress=False)  # fmt: skip
    for p in sorted(out.glob("*.bin")):
        assert (parallel / p.name).read_bytes() == p.read_bytes()
    assert json.loads((parallel / "metadata.json").read_text())["splits"] == again["splits"]


def _huge_vocab_tokenizer(path: Path) -> Path:
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_prepare_refuses_bad_inputs(tmp_path, capsys):
    tok = text_testing.bpe(tmp_path / "tok.json")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "bytes.txt").write_bytes(b"ok \xff\xfe not utf-8")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    text_testing.write_corpus(tmp_path / "c", n=20)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "col.parquet")
    cases = [
        (str(tmp_path / "nofield.jsonl"), tok, "nofield.jsonl:1: no field 'text'"),
        (str(tmp_path / "col.parquet"), tok, "col.parquet: no column 'text'"),
        (str(tmp_path / "bytes.txt"), tok, "bytes.txt: not valid UTF-8 at byte 3"),
        (str(tmp_path / "broken.jsonl"), tok, "broken.jsonl:2: not valid JSON"),
        (str(tmp_path / "nothing*.jsonl"), tok, "--input: no .txt"),
        (str(tmp_path / "c"), tmp_path / "missing.json", "--tokenizer .*no such file"),
    ]
    for inputs, tokenizer, match in cases:
        with pytest.raises(DataError, match=match):
            prepare.prepare(inputs, str(tokenizer), tmp_path / "out", progress=False)
    huge = _huge_vocab_tokenizer(tmp_path / "huge.json")
    with pytest.raises(DataError, match="--dtype uint16: the tokenizer has 70001 tokens"):
        prepare.prepare(str(tmp_path / "c"), str(huge), tmp_path / "o", dtype="uint16",
                        progress=False)  # fmt: skip
    with pytest.raises(DataError, match=r"--eos-token: .* has no token <bos>"):
        prepare.prepare(str(tmp_path / "c"), str(tok), tmp_path / "o", eos_token="<bos>",
                        progress=False)  # fmt: skip
    argv = ["--input", str(tmp_path / "nofield.jsonl"), "--tokenizer", str(tok), "--out",
            str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    assert prepare.main(argv) == 2
    assert (
        capsys.readouterr().err.startswith("error: ")
        and not (tmp_path / "o" / "metadata.json").exists()
    )


def test_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path):
    lines = [json.dumps({"text": f"w{65_536 + i} w{i}"}) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    tok = _huge_vocab_tokenizer(tmp_path / "h.json")
    meta = prepare.prepare(str(tmp_path / "d.jsonl"), str(tok), tmp_path / "out",
                           eval_fraction=0.3, progress=False)  # fmt: skip
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001
    tokens = np.concatenate([np.fromfile(tmp_path / "out" / f"{s}-00000.bin", np.uint32)
                             for s in ("train", "eval")])  # fmt: skip
    words = tokens[(tokens >= 65_536) & (tokens != meta["eos_id"])]
    assert sorted(words.tolist()) == [65_536 + i for i in range(40)]


# One GDN-2 block on the token-serial reference: the cheapest train step to compile on a CPU.
SMALL = ("model.block_pattern=gdn2", "model.gdn2_backend=scan", "model.vocab_size=320")


def _train_cfg(workdir, out, *extra):
    return tiny_config(workdir, *SMALL, "data.kind=tokens", f"data.paths={out}",
                       "checkpoint.async_save=false", "eval.num_batches=2", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BPE-prepared folder of 80 documents and a workdir trained on it for 8 steps."""
    root = tmp_path_factory.mktemp("trained")
    text_testing.write_corpus(root / "corpus", n=80)
    tok = text_testing.bpe(root / "tok.json")
    meta = prepare.prepare(str(root / "corpus"), str(tok), root / "out", eval_fraction=0.2,
                           progress=False)  # fmt: skip
    summary = trainer.train(_train_cfg(root / "run", root / "out"))
    return root / "out", meta, root / "run", summary


def test_training_holds_out_the_prepared_eval_split(trained, tmp_path):
    out, meta, _, summary = trained
    sources = data.make_sources(_train_cfg(tmp_path, out).data)
    for split, windows in (("eval", sources.eval), ("train", sources.train)):
        files = [
            np.fromfile(out / f["path"], meta["dtype"]) for f in meta["splits"][split]["files"]
        ]
        assert [np.asarray(s).tolist() for s in windows.streams] == [f.tolist() for f in files]
    assert summary["step"] == 8 and summary["eval"]["loss"] < math.log(320)


def _reference_nll(model, streams: list[np.ndarray], eos: int, width: int) -> tuple[float, int]:
    """Summed NLL of whole streams (one row each, documents as segments, padded to `width`)
    straight from the model's logits: every real target whose input is not end-of-document."""
    rows = np.full((len(streams), width + 1), eos, np.int64)
    real = np.zeros((len(streams), width), bool)
    for r, s in enumerate(streams):
        rows[r, : len(s)] = s
        real[r, : len(s) - 1] = True
    inputs, targets = rows[:, :-1], rows[:, 1:]
    segments = 1 + np.concatenate([np.zeros((len(rows), 1), int),
                                   np.cumsum(inputs == eos, axis=1)[:, :-1]], axis=1)  # fmt: skip
    logits = model(jnp.asarray(inputs, jnp.int32), segment_ids=jnp.asarray(segments, jnp.int32))
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), targets[..., None], axis=-1)[..., 0]
    scored = real & (inputs != eos)
    return float(nll[scored].sum()), int(scored.sum())


def test_ppl_scores_every_held_out_token_once(trained, tmp_path):
    """At a window longer than each held-out file, the command's summed loss is the model's
    own NLL of each whole file; bits per byte come from the metadata's byte count."""
    out, meta, workdir, _ = trained
    result = tmp_path / "ppl.json"
    argv = ["--checkpoint", str(workdir), "--suite", "ppl", "--data", str(out), "--seq-len",
            "512", "--batch-size", "1", "--no-progress", "--out", str(result)]  # fmt: skip
    assert evaluate.main(argv) == 0
    record = json.loads(result.read_text())
    _, model, _ = evaluate.load(workdir)
    held = meta["splits"]["eval"]
    streams = [np.fromfile(out / f["path"], meta["dtype"]).astype(np.int64) for f in held["files"]]
    assert max(map(len, streams)) <= 512
    nll, count = _reference_nll(model, streams, meta["eos_id"], 512)
    assert record["tokens"] == count == held["tokens"] - held["documents"]
    # float32 logits, summed over a few hundred tokens in another order.
    assert record["loss"] * record["tokens"] == pytest.approx(nll, rel=1e-5)
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
    assert record["bits_per_byte"] == pytest.approx(nll / math.log(2) / held["bytes"], rel=1e-5)
    assert record["whole_split"] and record["step"] == 8


def test_ppl_refuses_data_of_another_tokenizer(trained, tmp_path, capsys):
    other = text_testing.train_bpe(text_testing.documents(300, seed=7), 300, tmp_path / "o.json")
    text_testing.write_corpus(tmp_path / "corpus", n=60)
    prepare.prepare(str(tmp_path / "corpus"), str(other), tmp_path / "out", eval_fraction=0.2,
                    progress=False)  # fmt: skip
    workdir = trained[2]
    argv = ["--checkpoint", str(workdir), "--suite", "ppl", "--data", str(tmp_path / "out")]
    assert evaluate.main(argv) == 2
    assert "different tokenizer files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(workdir), "--suite", "ppl"])
    assert "--suite ppl needs --data" in capsys.readouterr().err


def test_training_refuses_metadata_mismatches(prepared, tmp_path):
    """Refused before anything is built, for either tokenizer's folder."""
    _, _, out, meta = prepared
    shard = out / meta["splits"]["train"]["files"][0]["path"]
    cases = [
        (("data.eos_id=5",), "data.eos_id=5 but .*metadata.json says the end-of-document id is"),
        (("data.token_dtype=uint32",), "data.token_dtype=uint32 but .*metadata.json says"),
        (("model.vocab_size=200",), "model.vocab_size=200 is smaller than the vocabulary"),
    ]
    for extra, match in cases:
        with pytest.raises(DataError, match=match):
            trainer.train(_train_cfg(tmp_path, out, *extra))
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "metadata.json").write_bytes((out / "metadata.json").read_bytes())
    for f in meta["splits"]["train"]["files"] + meta["splits"]["eval"]["files"]:
        (cut / f["path"]).write_bytes((out / f["path"]).read_bytes())
    (cut / shard.name).write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=f"{shard.name}: .* records .* cut short"):
        trainer.train(_train_cfg(tmp_path, cut))
    assert token_files.read_metadata(out)["format"] == prepare.FORMAT


def test_text_spelling_the_eos_token_does_not_end_a_document(tmp_path):
    doc = "a page that quotes <|endoftext|> and goes on"
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": doc}) for _ in range(30)))
    tok_path = text_testing.bpe(tmp_path / "tok.json")
    meta = prepare.prepare(str(tmp_path / "d.jsonl"), str(tok_path), tmp_path / "out",
                           eval_fraction=0.3, progress=False)  # fmt: skip
    tokens = np.fromfile(tmp_path / "out" / "train-00000.bin", meta["dtype"])
    docs = _docs(tokens, meta["eos_id"])
    assert len(docs) == meta["splits"]["train"]["documents"]
    assert all(load_tokenizer(tok_path).decode(d[:-1].tolist()) == doc for d in docs)
