"""A text corpus and tokenizer for trying the text pipeline without a download: the docstrings of
the running Python's standard library, one document each, and a byte-level BPE tokenizer.json
trained on them with the `tokenizers` library.

    python scripts/stdlib_text.py --out runs/text/corpus [--vocab-size 4096]

Writes OUT/docs.jsonl and OUT/tokenizer.json (end-of-document token `<|endoftext|>`). With your
own text and tokenizer, skip this and point `gdn2_jax.data.prepare` at them.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
from pathlib import Path

from gdn2_jax.data.tokenizer import train_bpe

MIN_CHARS = 200


def docstrings(root: Path):
    """Module, class and function docstrings of at least MIN_CHARS, in sorted file order."""
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately broken or not UTF-8 (test data)
        nodes = [
            tree,
            *(
                n
                for n in ast.walk(tree)
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            ),
        ]
        for node in nodes:
            text = ast.get_docstring(node)
            if text and len(text) >= MIN_CHARS:
                yield text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    docs = list(docstrings(Path(sysconfig.get_paths()["stdlib"])))
    with (args.out / "docs.jsonl").open("w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    train_bpe(docs, args.vocab_size, args.out / "tokenizer.json")
    chars = sum(map(len, docs))
    print(f"{args.out}: {len(docs)} documents, {chars:,} characters, tokenizer.json")


if __name__ == "__main__":
    main()
