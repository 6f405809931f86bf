#!/usr/bin/env bash
# Create .venv with fedmq and all its extras (agent, demo, test). Idempotent.
#   ./scripts/install.sh            # Python side only
#   ./scripts/install.sh --broker   # also Mosquitto 2, RabbitMQ (its MQTT plugin) and systemd-analyze
#                                   # via apt-get when missing (the tests run real brokers and verify
#                                   # the systemd units)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--broker" ] && ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "==> installing mosquitto (apt-get)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  # fedmq's tests start their own brokers; the packaged service is not needed
  $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

if [ "${1:-}" = "--broker" ] && [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  # the RabbitMQ MQTT-plugin test starts its own node (loopback ports, its own data directory)
  echo "==> installing rabbitmq-server (apt-get)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  # the package's own service must not start (it would listen on every interface): deny service
  # starts for the duration of the install, as Debian's policy-rc.d allows
  POLICY=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    POLICY=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null && $SUDO chmod +x "$POLICY"
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rabbitmq-server >/dev/null \
    || echo "    rabbitmq-server not installed: its test is skipped"
  [ -n "$POLICY" ] && $SUDO rm -f "$POLICY"
  $SUDO systemctl disable --now rabbitmq-server >/dev/null 2>&1 || true
  $SUDO service rabbitmq-server stop >/dev/null 2>&1 || true
fi

if [ "${1:-}" = "--broker" ] && ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "==> installing systemd-analyze (apt-get: systemd)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq systemd >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "==> installing torch (a CPU build is enough; CUDA builds work too)"
  "$VPY" -m pip install -q "torch==2.13.0"
fi
echo "==> installing fedmq with its agent, demo and test extras"
"$VPY" -m pip install -q -e ".[all]"
