"""Documents from text files: .txt (one document), .jsonl / .jsonl.gz / .jsonl.zst (one per
line) and .parquet (one per row, as FineWeb-Edu ships), each a `str` read from `field`.

Errors name the file and the line, row or byte that is wrong.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from gdn2_jax.data.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


def suffix_of(path: str | Path) -> str | None:
    """The supported suffix `path` ends with, or None."""
    name = str(path)
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def iter_documents(path: str | Path, field: str = "text") -> Iterator[str]:
    path = Path(path)
    suffix = suffix_of(path)
    if suffix is None:
        raise DataError(f"{path}: text files are {', '.join(SUFFIXES)}, not {path.name!r}")
    if suffix == ".txt":
        yield _decode(path.read_bytes(), str(path))
    elif suffix == ".parquet":
        yield from _parquet_documents(path, field)
    else:
        with _open_lines(path, suffix) as raw:
            yield from _jsonl_documents(raw, path, field)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 at byte {e.start} ({e.reason})") from None


def _open_lines(path: Path, suffix: str):
    if suffix == ".jsonl.gz":
        return gzip.open(path, "rb")
    if suffix == ".jsonl.zst":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)
        return io.BufferedReader(reader)
    return path.open("rb")


def _jsonl_documents(raw, path: Path, field: str) -> Iterator[str]:
    for lineno, line in enumerate(raw, 1):
        text = _decode(line, f"{path}:{lineno}")
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{lineno}: no field {field!r} (has {fields})")
        yield _text_value(record[field], f"{path}:{lineno}", field)


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    columns = table.schema_arrow.names
    if field not in columns:
        raise DataError(f"{path}: no column {field!r} (has {columns})")
    row = 0
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _text_value(value, f"{path}: row {row}", field)
            row += 1


def _text_value(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value
