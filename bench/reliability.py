"""Run the fault-injection tests and write their figures: bench/results/reliability.json and the
table of docs/reliability.md (between its BEGIN/END reliability markers).

    python -m bench.reliability              # runs tests/test_reliability.py (~5 min on 2 cores)
    python -m bench.reliability --from F.json  # only render figures a run already wrote
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import REPO, machine, md_table, write_json

DOC = REPO / "docs" / "reliability.md"

# scenario key -> (fault, test that proves it)
ROWS = [
    ("broker_restart_persistent", "Broker restarted mid-round, 3 times (persistence on)",
     "test_broker_restarted_mid_round_three_times_nothing_lost"),
    ("broker_restart_no_persistence", "Broker restarted mid-round without persistence",
     "test_broker_restarted_without_persistence_coordinator_reasserts_state"),
    ("coordinator_sigkill", "Coordinator SIGKILLed mid-round (twice) and restarted",
     "test_coordinator_sigkilled_mid_round_resumes_without_loss_or_double_count"),
    ("agent_sigkill", "Agent SIGKILLed mid-training and restarted",
     "test_agent_sigkilled_mid_training_rejoins_catches_up_and_trains_later_rounds"),
    ("duplicates_and_lost_chunks", "Duplicates (QoS 1 re-delivery, replayed old update), lost chunk",
     "test_duplicates_replays_and_lost_chunks_are_ignored_or_dropped"),
    ("stragglers", "Straggler: deadline + quorum, late update",
     "test_straggler_deadline_quorum_and_late_update_refused"),
    ("retry_without_quorum", "No quorum by the deadline: round retried",
     "test_round_without_quorum_is_retried_keeping_accepted_updates"),
    ("memory_200_rounds", "200 rounds: coordinator memory",
     "test_coordinator_memory_flat_over_200_rounds"),
]


def _notes(key: str, f: dict) -> str:
    parts = []
    for name, label in (("restored_from_disk", "restored from disk"), ("tasks_resent", "tasks re-sent"),
                        ("results_resent_by_agents", "results re-sent by agents"),
                        ("globals_reasserted", "retained global re-published"),
                        ("round_retries", "round retries"), ("late_refused", "late refused"),
                        ("frames_deduplicated", "chunk frames deduplicated"),
                        ("transfers_expired", "incomplete transfers expired")):
        if f.get(name):
            parts.append(f"{label}: {f[name]}")
    if key == "agent_sigkill":
        parts.append(f"killed agent aggregated in rounds {f['killed_agent_rounds']}")
    if key == "stragglers":
        parts.append(f"round 2 stragglers {f['round2_stragglers']}")
    if key == "memory_200_rounds":
        parts.append(f"RSS {f['rss_mb']['20']} → {f['rss_mb']['200']} MiB (round 20 → 200), "
                     f"growth {f['rss_growth_20_to_200_mb']} MiB < bound {f['rss_bound_mb']} MiB; {f['wall_s']} s")
    return "; ".join(parts)


def render(results: dict) -> str:
    figures = results["scenarios"]
    rows = []
    for key, fault, test in ROWS:
        f = figures.get(key)
        if f is None:
            rows.append([fault, f"`{test}`", "not run", "", "", "", "", "", "", ""])
            continue
        rows.append([fault, f"`{test}`", f["faults_injected"], f["updates_sent"], f["accepted"], f["aggregated"],
                     f["lost"], f.get("duplicates_ignored", 0), f["counted_twice"], _notes(key, f)])
    m = results["machine"]
    head = (f"Run: {m['date']}, commit {m['commit']}, {m['cores']} cores, Python {m['python']}; "
            f"whole set {results['wall_s']:.0f} s (`python -m bench.reliability`).\n\n")
    return head + md_table(
        ["fault", "test", "faults injected", "updates sent", "accepted", "aggregated", "lost",
         "duplicates ignored", "counted twice", "details"], rows)


def update_doc(markdown: str) -> None:
    begin, end = "<!-- BEGIN reliability -->", "<!-- END reliability -->"
    text = DOC.read_text()
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} has no {begin} ... {end} section")
    DOC.write_text(pattern.sub(lambda _: block, text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", help="figures JSON written by a test run (FEDMQ_RELIABILITY_OUT)")
    ap.add_argument("--wall-s", type=float, help="with --from: the run's wall time")
    args = ap.parse_args(argv)
    if args.source:
        scenarios = json.loads(Path(args.source).read_text())
        wall = args.wall_s or 0.0
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "figures.json"
            t0 = time.monotonic()
            rc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_reliability.py", "-q"], cwd=REPO,
                                env={**os.environ, "FEDMQ_RELIABILITY_OUT": str(out)}).returncode
            wall = time.monotonic() - t0
            if rc != 0:
                print(f"tests failed (exit {rc}); figures not written", file=sys.stderr)
                return rc
            scenarios = json.loads(out.read_text())
    results = {"machine": machine(), "wall_s": wall, "scenarios": scenarios}
    write_json("reliability", results)
    update_doc(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
