#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
#   ./scripts/test.sh            # whole suite (what CI runs)
#   ./scripts/test.sh -k chunk   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. Mosquitto 2 (the tests start their own brokers on loopback ports).
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "==> installing mosquitto (apt-get)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  # the tests run their own brokers; the packaged service is not needed
  $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

# 2. Python environment with the project and its extras.
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "==> installing torch (CPU is enough for the tests)"
  "$VPY" -m pip install -q "torch==2.13.0"
fi
echo "==> installing fedmq and its test dependencies"
"$VPY" -m pip install -q -e ".[all]"

# 3. The real model used by the integration tests, converted once into the cache.
echo "==> fetching SmolLM2-135M-Instruct into the model cache"
"$VPY" -m fedmq --log-level WARNING model fetch smollm2-135m

# 4. The suite.
echo "==> running tests"
exec "$VPY" -m pytest "$@"
