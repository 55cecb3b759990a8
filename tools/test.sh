#!/usr/bin/env bash
# Runs the test suite; bootstraps the install (tools/install.sh) on a fresh machine.
# Extra arguments go to pytest, e.g. ./tools/test.sh -k scoring
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/tools/install.sh"
exec "$root/.venv/bin/python" -m pytest "$@"
