#!/bin/sh
# The README's first command: install what is needed, then run the demo of the main job
# (a local ACME server, the daemon on high ports, config and state under ./demo-state/).
set -eu
cd "$(dirname "$0")/.."
sh scripts/install-deps.sh
exec python3 scripts/demo.py "$@"
