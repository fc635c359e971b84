#!/bin/sh
# The README's test command: install what the tests need, then run them all.
set -eu
cd "$(dirname "$0")/.."
sh scripts/install-deps.sh
python3 -m ruff check certkeeper tests bench scripts
python3 -m mypy certkeeper
exec python3 -m pytest -q "$@"
