"""Apply FedKRSO ledger rounds from a file on a fresh model in this process; print its weights digest.

    python -m tests.krso_replay_worker THREADS MODEL LEDGER.msgpack
"""

from __future__ import annotations

import sys

import msgpack
import torch


def main() -> None:
    threads, model, ledger_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(threads)
    from edge_agent.methods.krso import KrsoMethod
    from fedmq_protocol.messages import AdapterSpec
    from fedmq_protocol.modes.krso import KrsoLedgerRound

    method = KrsoMethod(model, AdapterSpec(), device="cpu")
    with open(ledger_file, "rb") as fh:
        entries = [KrsoLedgerRound.from_obj(x) for x in msgpack.unpackb(fh.read(), raw=False)]
    for e in sorted(entries, key=lambda e: e.round):
        method.apply_round(e)
    print("DIGEST", torch.get_num_threads(), method.weights_digest())


if __name__ == "__main__":
    main()
