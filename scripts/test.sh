#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, check layering, lint and types, then
# run the tests.
#   ./scripts/test.sh            # whole suite (what CI runs)
#   ./scripts/test.sh -k chunk   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh --broker
# The real model of the integration tests, converted once into the cache (~30 s the first time).
echo "==> fetching SmolLM2-135M-Instruct into the model cache"
.venv/bin/fedmq --log-level WARNING model fetch smollm2-135m
echo "==> static checks: import contracts (lint-imports), ruff, mypy"
.venv/bin/lint-imports
.venv/bin/ruff check .
.venv/bin/mypy
echo "==> running tests"
exec .venv/bin/python -m pytest "$@"
