"""Replay seed ledger files on fresh models in this process; print each model's parameter digest.

    python -m tests.zo_replay_worker THREADS WORKERS MODEL:TARGET:LEDGER.msgpack ...
"""

from __future__ import annotations

import sys

import msgpack
import torch


def main() -> None:
    threads, workers = int(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(threads)
    from edge_agent.methods.zo import ZoMethod
    from edge_agent.models import resolve_model
    from fedmq_protocol.messages import AdapterSpec
    from fedmq_protocol.modes.zo import ZoLedgerRound

    for job in sys.argv[3:]:
        model, target, ledger_file = job.split(":", 2)
        method = ZoMethod(resolve_model(model), AdapterSpec(), device="cpu", target=target, workers=workers)
        with open(ledger_file, "rb") as fh:
            entries = [ZoLedgerRound.model_validate(x) for x in msgpack.unpackb(fh.read(), raw=False)]
        for e in sorted(entries, key=lambda e: e.round):
            method.apply_round(e)
        print("DIGEST", torch.get_num_threads(), job, method.param_digest())


if __name__ == "__main__":
    main()
