#!/usr/bin/env bash
# The test command from the README. Pass extra pytest arguments, e.g. -m "not slow" for the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q -ra "$@"
