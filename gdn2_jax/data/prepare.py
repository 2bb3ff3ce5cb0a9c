"""Tokenize a folder of text into token shards that `data.kind=tokens` trains on.

    python -m gdn2_jax.data.prepare --input DIR_OR_GLOB --tokenizer PATH --out DIR \
        [--field text] [--workers N] [--dtype auto|uint16|uint32] [--eval-fraction 0.005]

Inputs are .txt (one document), .jsonl[.gz|.zst] (one per line) and .parquet (one per row)
files; a folder is searched recursively. The tokenizer is a Hugging Face tokenizer.json or a
SentencePiece .model (or a model folder holding one). Each document is encoded without special
tokens and closed with the end-of-document id; empty documents are skipped.

Input file i becomes `train-0000i.bin` and `eval-0000i.bin` (flat uint16/uint32 tokens; a
document goes to the held-out split when a hash of its file name and index falls below
`--eval-fraction`, so the split does not depend on the number of workers), with a record
`shard-0000i.json`. A shard whose record matches the source file (size, mtime), tokenizer hash
and settings is kept, so an interrupted run resumes where it stopped and a finished one is
idempotent. `metadata.json` (dtype, vocabulary, eos id, tokenizer hash, document, token and
byte counts, files per split, sources) is written last, atomically: a folder with it is whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import multiprocessing
import os
import sys
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gdn2_jax.data import documents
from gdn2_jax.data.errors import DataError
from gdn2_jax.data.token_files import FORMAT, METADATA
from gdn2_jax.data.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "eval")
DOCS_PER_BATCH = 256


@dataclasses.dataclass(frozen=True)
class ShardJob:
    index: int
    source: str
    out: str
    tokenizer: str
    eos_token: str | None
    field: str
    dtype: str
    eval_fraction: float

    def key(self, tok: Tokenizer) -> dict:
        """What a finished shard must match to be kept."""
        st = os.stat(self.source)
        return {
            "source": self.source, "source_bytes": st.st_size, "source_mtime_ns": st.st_mtime_ns,
            "tokenizer_sha256": tok.info.sha256, "eos_id": tok.info.eos_id, "dtype": self.dtype,
            "field": self.field, "eval_fraction": self.eval_fraction,
        }  # fmt: skip

    def path(self, kind: str) -> Path:
        name = (
            f"shard-{self.index:05d}.json" if kind == "record" else f"{kind}-{self.index:05d}.bin"
        )
        return Path(self.out) / name


def resolve_inputs(spec: str) -> list[Path]:
    """A folder (searched recursively) or a glob, as sorted supported files."""
    root = Path(spec)
    if root.is_dir():
        found = sorted(p for p in root.rglob("*") if p.is_file() and documents.suffix_of(p))
        where = f"folder {spec}"
    else:
        found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        where = f"pattern {spec!r}"
        bad = [str(p) for p in found if not documents.suffix_of(p)]
        if bad:
            raise DataError(f"--input: {bad[0]} is not one of {', '.join(documents.SUFFIXES)}")
    if not found:
        raise DataError(f"--input: no {', '.join(documents.SUFFIXES)} files in {where}")
    return [p.resolve() for p in found]


def pick_dtype(requested: str, vocab_size: int) -> str:
    fits16 = vocab_size <= 2**16
    if requested == "auto":
        return "uint16" if fits16 else "uint32"
    if requested == "uint16" and not fits16:
        raise DataError(
            f"--dtype uint16: the tokenizer has {vocab_size} tokens, more than uint16 holds "
            "(65536); use --dtype uint32 or auto"
        )
    return requested


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str, eos_token: str | None) -> Tokenizer:
    """One tokenizer per worker process, loaded on its first shard."""
    return load_tokenizer(path, eos_token)


def held_out(name: str, index: int, fraction: float) -> bool:
    return zlib.crc32(f"{name}\0{index}".encode()) < fraction * 2**32


def _batches(job: ShardJob):
    batch = []
    for doc in documents.iter_documents(job.source, job.field):
        batch.append(doc)
        if len(batch) == DOCS_PER_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _empty_counts() -> dict:
    return {"documents": 0, "tokens": 0, "bytes": 0, "max_id": -1}


def tokenize_shard(job: ShardJob) -> dict:
    """Writes the shard's two token files and its record (or keeps them); returns the record."""
    tok = _tokenizer(job.tokenizer, job.eos_token)
    key = job.key(tok)
    record_path = job.path("record")
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["key"] == key and all(
            job.path(s).is_file()
            and job.path(s).stat().st_size == record[s]["tokens"] * np.dtype(job.dtype).itemsize
            for s in SPLITS
        ):
            return record | {"reused": True}
    counts = {s: _empty_counts() for s in SPLITS}
    skipped, index = 0, 0
    tmp = {s: job.path(s).with_suffix(".bin.tmp") for s in SPLITS}
    files = {s: tmp[s].open("wb") for s in SPLITS}
    try:
        for batch in _batches(job):
            for text, ids in zip(batch, tok.encode_batch(batch), strict=True):
                index += 1
                if not ids:
                    skipped += 1
                    continue
                split = (
                    "eval"
                    if held_out(Path(job.source).name, index - 1, job.eval_fraction)
                    else "train"
                )
                _append(files[split], counts[split], ids, text, tok, job)
    finally:
        for f in files.values():
            f.close()
    for s in SPLITS:
        os.replace(tmp[s], job.path(s))
    record = {"key": key, **counts, "skipped_empty_documents": skipped}
    _write_atomic(record_path, record)
    return record | {"reused": False}


def _append(f, counts: dict, ids: list[int], text: str, tok: Tokenizer, job: ShardJob) -> None:
    arr = np.asarray([*ids, tok.info.eos_id], np.int64)
    if arr.min() < 0 or arr.max() >= tok.info.vocab_size:
        raise DataError(
            f"{job.source}: the tokenizer produced id {arr.max()} outside its vocabulary "
            f"[0, {tok.info.vocab_size})"
        )
    f.write(arr.astype(job.dtype).tobytes())
    counts["documents"] += 1
    counts["tokens"] += len(arr)
    counts["bytes"] += len(text.encode("utf-8"))
    counts["max_id"] = max(counts["max_id"], int(arr.max()))


def _write_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _run(jobs: list[ShardJob], workers: int, progress: bool) -> list[dict]:
    """Records in job order; the bar advances by each finished source file's bytes."""
    records: dict[int, dict] = {}
    total = sum(os.path.getsize(j.source) for j in jobs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:
        if workers <= 1:
            done = ((j.index, tokenize_shard(j)) for j in jobs)
            pool = None
        else:
            # Spawned, not forked: the parent may hold threads (tokenizers, grain) a fork copies.
            pool = multiprocessing.get_context("spawn").Pool(workers)
            done = pool.imap_unordered(_indexed, jobs)
        try:
            tokens = 0
            for index, record in done:
                records[index] = record
                tokens += sum(record[s]["tokens"] for s in SPLITS)
                bar.update(os.path.getsize(jobs[index].source))
                bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
        finally:
            if pool is not None:
                pool.terminate()
    return [records[j.index] for j in jobs]


def _indexed(job: ShardJob) -> tuple[int, dict]:
    return job.index, tokenize_shard(job)


def metadata(jobs: list[ShardJob], records: list[dict], tok: Tokenizer, dtype: str) -> dict:
    splits = {}
    for s in SPLITS:
        files = [
            {"path": job.path(s).name, **rec[s]}
            for job, rec in zip(jobs, records, strict=True)
            if rec[s]["tokens"]
        ]
        splits[s] = {
            "files": files,
            **{k: sum(f[k] for f in files) for k in ("documents", "tokens", "bytes")},
        }
    return {
        "format": FORMAT,
        "version": 1,
        "dtype": dtype,
        "vocab_size": tok.info.vocab_size,
        "eos_id": tok.info.eos_id,
        "tokenizer": dataclasses.asdict(tok.info),
        "field": jobs[0].field,
        "eval_fraction": jobs[0].eval_fraction,
        "splits": splits,
        "skipped_empty_documents": sum(r["skipped_empty_documents"] for r in records),
        "sources": [
            {"path": j.source, "bytes": r["key"]["source_bytes"]}
            for j, r in zip(jobs, records, strict=True)
        ],
    }


def prepare(
    inputs: str, tokenizer: str, out: str | Path, *, field: str = "text", workers: int = 1,
    dtype: str = "auto", eval_fraction: float = 0.005, eos_token: str | None = None,
    progress: bool = True,
) -> dict:  # fmt: skip
    """Tokenizes `inputs` into `out`; returns the metadata it wrote."""
    if not 0 < eval_fraction < 1:
        raise DataError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    sources = resolve_inputs(inputs)
    tok = _tokenizer(str(Path(tokenizer).resolve()), eos_token)
    dtype = pick_dtype(dtype, tok.info.vocab_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        ShardJob(i, str(src), str(out), str(Path(tok.info.path).resolve()), eos_token, field,
                 dtype, eval_fraction)
        for i, src in enumerate(sources)
    ]  # fmt: skip
    records = _run(jobs, min(workers, len(jobs)), progress)
    meta = metadata(jobs, records, tok, dtype)
    for s in SPLITS:
        if not meta["splits"][s]["tokens"]:
            raise DataError(
                f"--input: no document fell into the {s} split of {len(sources)} file(s) "
                f"({meta['splits']['train']['documents'] + meta['splits']['eval']['documents']} "
                f"non-empty documents at --eval-fraction {eval_fraction})"
            )
    _write_atomic(out / METADATA, meta)
    return meta


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--input", required=True, help="folder or glob of text files")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json or SentencePiece .model")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--field", default="text", help="text field of .jsonl / .parquet rows")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto")
    parser.add_argument("--eval-fraction", type=float, default=0.005, help="held-out documents")
    parser.add_argument("--eos-token", help="end-of-document token (default: the tokenizer's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        meta = prepare(
            args.input, args.tokenizer, args.out, field=args.field, workers=args.workers,
            dtype=args.dtype, eval_fraction=args.eval_fraction, eos_token=args.eos_token,
            progress=not args.no_progress,
        )  # fmt: skip
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, held = meta["splits"]["train"], meta["splits"]["eval"]
    print(
        f"{args.out}: {train['tokens']:,} train tokens ({train['documents']:,} documents), "
        f"{held['tokens']:,} held-out tokens ({held['documents']:,} documents), {meta['dtype']}, "
        f"vocabulary {meta['vocab_size']}, eos id {meta['eos_id']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
