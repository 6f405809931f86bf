#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
#   ./scripts/test.sh            # whole suite (what CI runs)
#   ./scripts/test.sh -k chunk   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh --broker
# The real model of the integration tests, converted once into the cache (~30 s the first time).
echo "==> fetching SmolLM2-135M-Instruct into the model cache"
.venv/bin/fedmq --log-level WARNING model fetch smollm2-135m
echo "==> running tests"
exec .venv/bin/python -m pytest "$@"
