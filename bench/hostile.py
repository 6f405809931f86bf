"""A federation on an open Mosquitto with and without a hostile client flooding it: round time,
rounds completed, the flood rate held and what each side refused (bench/results/hostile.json; the
figures of docs/reliability.md "Hostile network").

    python -m bench.hostile            # 3 runs of 2 agents x 2 rounds (tiny Llama), ~3 min on 2 cores

The runs are those of tests/test_hostile_network.py (the same helper and checks): without the
flood, with it (the defaults: sealed, unsigned coordinator messages), and with it and signatures
required both ways.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.report import command_line, machine, write_json


def main() -> int:
    from tests.mosquitto import MosquittoBroker, find_mosquitto
    from tests.test_hostile_network import _check_flood, _run_under_flood

    exe = find_mosquitto()
    if exe is None:
        raise SystemExit("mosquitto is needed (scripts/install.sh --broker)")
    rows: dict[str, dict] = {}
    brokers: list[MosquittoBroker] = []
    with tempfile.TemporaryDirectory() as tmp:
        def broker() -> MosquittoBroker:
            b = MosquittoBroker(Path(tmp) / f"broker{len(brokers)}", exe=exe)
            brokers.append(b)
            return b.start()

        try:
            for name, rate, signed in (("no_flood", None, False), ("flood", 250.0, False),
                                       ("flood_signed", 250.0, True)):
                out = Path(tmp) / name
                out.mkdir()
                t0 = time.monotonic()
                run = _run_under_flood(broker, out, signed=signed, rate=rate)
                row = _check_flood(run, signed=signed) if rate else {
                    "rounds_completed": run["rounds"], "round_s": run["round_s"], "eval_loss": run["eval_loss"],
                    "coordinator_refused": run["figures"]["updates_rejected"] + run["figures"]["status_rejected"],
                    "wall_s": run["wall_s"]}
                row["mean_round_s"] = round(statistics.mean(run["round_s"]), 2)
                row["run_s"] = round(time.monotonic() - t0, 1)
                rows[name] = row
                print(name, row, flush=True)
        finally:
            for b in brokers:
                b.stop()
    base = rows["no_flood"]["mean_round_s"]
    for name in ("flood", "flood_signed"):
        rows[name]["round_time_vs_no_flood"] = round(rows[name]["mean_round_s"] / base, 2)
    path = write_json("hostile", {"command": command_line(), "machine": machine(), "runs": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
