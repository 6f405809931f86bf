#!/usr/bin/env bash
# Install fedmq into .venv if needed, then run `fedmq demo` (arguments are passed on).
#   ./scripts/demo.sh                       # 3 agents, 3 rounds, SmolLM2-135M, QLoRA, embedded broker
#   ./scripts/demo.sh --rounds 5 --method lora --summary demo.json
#   ./scripts/demo.sh --method zo --uplink int4 --downlink int8   # see --help for every option
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh >&2
exec .venv/bin/fedmq demo "$@"
