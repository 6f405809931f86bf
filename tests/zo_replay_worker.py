"""Replay a seed ledger file on a fresh model in this process and print the parameters' digest.

    python -m tests.zo_replay_worker MODEL TARGET LEDGER.msgpack THREADS WORKERS
"""

from __future__ import annotations

import sys

import msgpack
import torch


def main() -> None:
    model, target, ledger_file, threads, workers = sys.argv[1:6]
    torch.set_num_threads(int(threads))
    from edge_agent.methods.zo import ZoMethod
    from edge_agent.models import resolve_model
    from fedmq_protocol.messages import AdapterSpec
    from fedmq_protocol.zo import ZoLedgerRound

    method = ZoMethod(resolve_model(model), AdapterSpec(), device="cpu", target=target, workers=int(workers))
    with open(ledger_file, "rb") as fh:
        entries = [ZoLedgerRound.model_validate(x) for x in msgpack.unpackb(fh.read(), raw=False)]
    for e in sorted(entries, key=lambda e: e.round):
        method.apply_round(e)
    print("DIGEST", torch.get_num_threads(), method.param_digest())


if __name__ == "__main__":
    main()
