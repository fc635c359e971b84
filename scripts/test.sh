#!/bin/sh
# The README's test command: install what the tests need, then run them all.
set -eu
cd "$(dirname "$0")/.."
sh scripts/install-deps.sh
if [ "$(id -u)" = 0 ]; then
    # As root the suite runs the network worker and the listener as _certkeeper, as production does
    # (certkeeper(8), PRIVILEGE SEPARATION): that user must exist and reach this interpreter and checkout.
    id _certkeeper >/dev/null 2>&1 \
        || useradd --system --no-create-home --home-dir /var/empty --shell /usr/sbin/nologin _certkeeper
    python3 scripts/reachable.py
fi
python3 -m ruff check certkeeper tests bench scripts
python3 -m mypy certkeeper
exec python3 -m pytest -q "$@"
