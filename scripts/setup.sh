#!/usr/bin/env bash
# Creates .venv with Python 3.12 and installs gdn2-jax with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  # pyenv shims answer `command -v` even when 3.12 is not selected, so run it to be sure.
  if python3.12 --version >/dev/null 2>&1; then command -v python3.12; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    for p in "$(pyenv root)"/versions/3.12*/bin/python3.12; do
      if [ -x "$p" ]; then echo "$p"; return; fi
    done
  fi
  echo "error: Python 3.12 not found (JAX 0.11 needs Python >= 3.12)" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,dev]"
