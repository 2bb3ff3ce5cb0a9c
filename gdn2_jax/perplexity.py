"""Held-out perplexity of a checkpoint on token files (`evaluate --suite ppl`).

Every token of the held-out files is scored once: the files are cut into windows of the
training length that share one token (the last target of one is the first input of the next),
the last window of a file padded with tokens that carry no loss. As in training, the state
resets at each document and the prediction made from an end-of-document token (a document's
first token, which nothing before the reset informs) is not scored. The loss is token-weighted
(summed over scored tokens, divided by their number); bits per byte divide the summed loss in
bits by the UTF-8 bytes of the held-out documents, where the preparation tool recorded them and
the whole split was scored (unscored first tokens make it a slight underestimate).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from gdn2_jax import sharding
from gdn2_jax.config import Config
from gdn2_jax.data import packed, token_files
from gdn2_jax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class HeldOut:
    windows: packed.PackedWindows
    files: tuple[token_files.TokenFile, ...]
    data: token_files.TokenData


def held_out(cfg: Config, paths: Sequence[str], seq_len: int) -> HeldOut:
    """The held-out split of prepared folders in `paths` (token files named directly are
    scored whole), checked against the model the checkpoint `cfg` describes."""
    if cfg.data.kind != "tokens":
        raise DataError(
            f"--suite ppl: the checkpoint was trained on data.kind={cfg.data.kind!r}; perplexity "
            "on token files needs a model trained on them (data.kind='tokens')"
        )
    data = token_files.load(paths, (), cfg.data.token_dtype, cfg.data.eos_id)
    token_files.check_model_vocab(data, cfg.model.vocab_size)
    _check_same_tokenizer(cfg, data)
    files = data.eval or data.train
    windows = packed.PackedWindows([f.tokens for f in files], seq_len, data.eos_id, pad_last=True)
    return HeldOut(windows, files, data)


def _check_same_tokenizer(cfg: Config, data: token_files.TokenData) -> None:
    """Refuses held-out data tokenized otherwise than the training data, when both say how."""
    trained = [
        token_files.read_metadata(p) for p in cfg.data.paths if Path(p, "metadata.json").is_file()
    ]
    for meta in trained:
        for p in data.prepared:
            if meta["tokenizer"]["sha256"] != p.meta["tokenizer"]["sha256"]:
                raise DataError(
                    f"--data {p.folder} was tokenized by {p.meta['tokenizer']['path']}, but the "
                    f"model was trained on data tokenized by {meta['tokenizer']['path']} "
                    "(different tokenizer files)"
                )


def batches(windows: packed.PackedWindows, batch_size: int, max_batches: int | None):
    """Fixed-shape batches of consecutive windows; the last is filled with loss-free rows."""
    n = len(windows)
    count = -(-n // batch_size)
    if max_batches is not None:
        count = min(count, max_batches)
    for b in range(count):
        rows = [windows[i] for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        filler = dict(rows[0], loss_mask=np.zeros_like(rows[0]["loss_mask"]))
        rows += [filler] * (batch_size - len(rows))
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def score(run, params, held: HeldOut, *, batch_size: int, max_batches: int | None = None,
          progress: bool = True) -> dict:  # fmt: skip
    """Token-weighted loss, perplexity, bits per token and (where known) bits per byte."""
    total = -(-len(held.windows) // batch_size)
    count = total if max_batches is None else min(total, max_batches)
    sums = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
    with tqdm(total=count, desc="ppl", unit="batch", disable=not progress) as bar:
        for batch in batches(held.windows, batch_size, max_batches):
            stats = jax.device_get(
                run.eval_fn(params, sharding.host_local_to_global(batch, run.mesh))
            )
            for k in sums:
                sums[k] += float(stats[k])
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss_sum'] / max(sums['tokens'], 1):.4f}", refresh=False)
    if not sums["tokens"]:
        raise DataError("--data: the held-out windows hold no scored token")
    loss = sums["loss_sum"] / sums["tokens"]
    text_bytes = [f.text_bytes for f in held.files]
    whole = count == total
    bpb = (
        sums["loss_sum"] / math.log(2) / sum(text_bytes)
        if whole and None not in text_bytes and sum(text_bytes)
        else None
    )
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "bits_per_token": loss / math.log(2),
        "bits_per_byte": bpb,
        "accuracy": sums["correct"] / sums["tokens"],
        "tokens": int(sums["tokens"]),
        "windows": min(len(held.windows), count * batch_size),
        "whole_split": whole,
        "files": [f.path for f in held.files],
    }
