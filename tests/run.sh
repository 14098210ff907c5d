#!/usr/bin/env bash
# The test command of the README: installs what the browser test needs (Debian's chromium,
# when running as root with apt) and runs the whole suite with the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" -m pytest -q "$@"
