"""Bad token data stops before training with an error naming the file (and offset), never a
run that trains on garbage: one test per token-data finding of the hostile review, through the
trainer (each is refused before anything compiles) or train.py itself."""

import dataclasses
import importlib.util

import numpy as np
import pytest
import text_testing
from train_testing import ROOT, tiny_config

from gdn2_jax import data, trainer
from gdn2_jax.config import DataConfig
from gdn2_jax.data import DataError, packed, prepare


def _cfg(tmp_path, path, *extra):
    return tiny_config(tmp_path / "run", "data.kind=tokens", f"data.paths={path}", *extra)


def _tokens(n=400, vocab=32, eos=0):
    tokens = np.random.default_rng(0).integers(1, vocab, n)
    tokens[::17] = eos
    return tokens


def test_id_at_or_above_vocab_is_an_error_naming_file_and_offset_not_divergence(tmp_path):
    tokens = _tokens().astype(np.uint16)
    tokens[123] = 32  # model.vocab_size=32 in the tiny config
    path = tmp_path / "toks.bin"
    tokens.tofile(path)
    cfg = _cfg(tmp_path, path, "data.token_dtype=uint16", "data.eos_id=0")
    match = r"toks.bin: token id 32 at offset 123 is outside \[0, 32\)"
    with pytest.raises(DataError, match=match):
        trainer.train(cfg)


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_negative_id_is_an_error_naming_file_and_offset_not_wrapped(tmp_path, suffix):
    tokens = _tokens().astype(np.int32)
    tokens[77] = -3
    path = tmp_path / f"toks{suffix}"
    np.save(path, tokens) if suffix == ".npy" else tokens.tofile(path)
    extra = ["data.eos_id=0"] + (["data.token_dtype=int32"] if suffix == ".bin" else [])
    with pytest.raises(DataError, match=f"toks{suffix}: token id -3 at offset 77 is negative"):
        trainer.train(_cfg(tmp_path, path, *extra))


def test_float_npy_token_file_is_refused_not_truncated_to_zeros(tmp_path):
    path = tmp_path / "toks.npy"
    np.save(path, _tokens().astype(np.float32) / 100)
    with pytest.raises(DataError, match=r"toks.npy: holds float32 values; token ids must be an"):
        trainer.train(_cfg(tmp_path, path, "data.eos_id=0"))


def test_bin_without_declared_dtype_is_refused_not_read_as_uint16(tmp_path):
    path = tmp_path / "toks.bin"
    _tokens().astype(np.uint32).tofile(path)
    with pytest.raises(DataError, match=r"toks.bin: a raw .bin records no dtype; declare it"):
        trainer.train(_cfg(tmp_path, path, "data.eos_id=0"))
    # Declared, it reads back the ids that were written.
    cfg = DataConfig(kind="tokens", paths=(str(path),), token_dtype="uint32", eos_id=0, seq_len=16)
    stream = data.make_sources(cfg).tokens.train[0].tokens
    np.testing.assert_array_equal(stream, _tokens())


def test_npy_dtype_disagreeing_with_the_declared_one_is_refused(tmp_path):
    path = tmp_path / "toks.npy"
    np.save(path, _tokens().astype(np.uint32))
    with pytest.raises(DataError, match=r"data.token_dtype=uint16 but .*toks.npy holds uint32"):
        trainer.train(_cfg(tmp_path, path, "data.token_dtype=uint16", "data.eos_id=0"))


def test_bin_of_a_partial_token_is_refused(tmp_path):
    path = tmp_path / "toks.bin"
    path.write_bytes(_tokens().astype(np.uint16).tobytes() + b"\x01")
    with pytest.raises(DataError, match=r"toks.bin: 801 bytes is not a whole number of uint16"):
        trainer.train(_cfg(tmp_path, path, "data.token_dtype=uint16", "data.eos_id=0"))


def test_empty_token_file_is_refused(tmp_path):
    path = tmp_path / "toks.bin"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"toks.bin: the file holds no tokens"):
        trainer.train(_cfg(tmp_path, path, "data.token_dtype=uint16", "data.eos_id=0"))


def test_all_padding_token_data_is_refused_not_trained_at_loss_zero(tmp_path):
    path = tmp_path / "toks.npy"
    np.save(path, np.full(400, 5, np.uint16))
    with pytest.raises(DataError, match=r"every token is the end-of-document id 5 \(all padding"):
        trainer.train(_cfg(tmp_path, path, "data.eos_id=5"))


def test_all_empty_text_documents_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"every document in .*empty.jsonl is empty"):
        packed.byte_stream([str(tmp_path / "empty.jsonl")])


def test_token_files_without_eos_id_are_refused(tmp_path):
    path = tmp_path / "toks.npy"
    np.save(path, _tokens().astype(np.uint16))
    with pytest.raises(DataError, match=r"data.eos_id: token files without a metadata.json"):
        trainer.train(_cfg(tmp_path, path))


def test_train_py_reports_bad_data_as_one_error_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    path = tmp_path / "toks.npy"
    np.save(path, _tokens().astype(np.float64))
    sets = ["data.kind=tokens", f"data.paths={path}", "data.eos_id=0", f"train.workdir={tmp_path}"]
    argv = ["--config", str(ROOT / "configs" / "recall_tiny.py")]
    argv += [x for item in sets for x in ("--set", item)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "toks.npy: holds float64" in err and err.count("\n") == 1


def test_uint32_shard_named_directly_is_read_with_its_metadata_dtype(tmp_path):
    """The finding's case (a uint32 .bin read as uint16) with the preparation tool's sidecar:
    the metadata's dtype is used, and a contradicting declaration is refused."""
    text_testing.write_corpus(tmp_path / "corpus", n=40)
    tok = text_testing.bpe(tmp_path / "tok.json")
    prepare.prepare(str(tmp_path / "corpus"), str(tok), tmp_path / "out", dtype="uint32",
                    eval_fraction=0.2, progress=False)  # fmt: skip
    shard = tmp_path / "out" / "train-00000.bin"
    cfg = DataConfig(kind="tokens", paths=(str(shard),), seq_len=16)
    sources = data.make_sources(cfg)
    np.testing.assert_array_equal(sources.tokens.train[0].tokens, np.fromfile(shard, np.uint32))
    assert sources.tokens.eos_id == 0 and sources.tokens.vocab_size == 300
    with pytest.raises(DataError, match=r"data.token_dtype=uint16 but .*says train-00000.bin is"):
        data.make_sources(dataclasses.replace(cfg, token_dtype="uint16"))
