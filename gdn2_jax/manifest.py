"""Integrity manifests of checkpoint steps: every file's size and SHA-256.

Written into the step directory once orbax has finalized the step (the manifest goes to a
temporary file that is renamed over the final name, so it appears whole or not at all), and
checked before a step is trusted: a step without a valid manifest, or with a file missing,
resized, changed or added, is damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NAME = "gdn2_manifest.json"
FORMAT = 1


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256s(paths: list[Path]) -> list[str]:
    """The files' digests, several at a time: hashlib releases the GIL while it hashes, and a
    large model's step holds gigabytes in several files."""
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


def _files(step_dir: Path) -> list[str]:
    names = (p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
    return sorted(n for n in names if not n.startswith(NAME))


def write(step_dir: Path, step: int) -> None:
    names = _files(step_dir)
    digests = _sha256s([step_dir / name for name in names])
    files = {
        name: {"size": (step_dir / name).stat().st_size, "sha256": digest}
        for name, digest in zip(names, digests, strict=True)
    }
    tmp = step_dir / f"{NAME}.tmp"
    with tmp.open("w") as f:
        json.dump({"format": FORMAT, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / NAME)


def _read(step_dir: Path, step: int) -> tuple[dict | None, str]:
    """The manifest's file table, or None and why it cannot be trusted."""
    path = step_dir / NAME
    if not path.is_file():
        return None, f"it has no {NAME} (its save did not complete, or it predates manifests)"
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"its {NAME} is not valid JSON ({e})"
    if not isinstance(manifest, dict):
        manifest = {}
    files = manifest.get("files")
    well_formed = (
        isinstance(files, dict)
        and files
        and all(isinstance(e, dict) and {"size", "sha256"} <= set(e) for e in files.values())
    )
    if manifest.get("format") != FORMAT or manifest.get("step") != step or not well_formed:
        return None, f"its {NAME} is not a format-{FORMAT} manifest of step {step}"
    return files, ""


def problems(step_dir: Path, step: int) -> list[str]:
    """What is wrong with the step's files; empty when every file matches its manifest."""
    files, why = _read(step_dir, step)
    if files is None:
        return [why]
    out, sized = [], []
    for name, entry in sorted(files.items()):
        path = step_dir / name
        if not path.is_file():
            out.append(f"{name}: missing")
        elif (size := path.stat().st_size) != entry["size"]:
            out.append(f"{name}: {size} bytes, {entry['size']} when saved")
        else:
            sized.append(name)
    digests = _sha256s([step_dir / name for name in sized])
    for name, digest in zip(sized, digests, strict=True):
        if digest != files[name]["sha256"]:
            out.append(f"{name}: contents changed since the save (SHA-256 differs)")
    out += [f"{name}: not written by the save" for name in _files(step_dir) if name not in files]
    return out
