"""What the coordinator counts: accepted and refused input, restarts of either side."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CoordinatorCounters:
    updates_accepted: int = 0
    updates_rejected: int = 0
    duplicates: int = 0
    late: int = 0
    stale: int = 0  # asynchronous rounds: updates trained on a global more than max_staleness versions old
    tasks_expired: int = 0  # asynchronous rounds: tasks unanswered for task_timeout_s, dropped
    fit_accepted: int = 0  # fit updates accepted (all are aggregated: a retry carries them over)
    restored: int = 0  # accepted before a restart, read back from the open round on disk
    tasks_resent: int = 0  # open tasks sent again to a device that restarted, or after a broker restart
    reconnects: int = 0
    globals_reasserted: int = 0  # retained global re-published after the broker lost it
    signature_rejected: int = 0  # also counted in updates_rejected
    status_rejected: int = 0
    frames_rejected: int = 0  # refused by the transport before decoding (framing, chunking, size)
    errors: int = 0  # unexpected exceptions while handling input (a bug; counted, logged, survived)
    dropped: int = 0  # input dropped unread: its class's intake queue was full (a flood)
    queued_after_restart: int = 0  # updates the broker held for a restarted coordinator, accepted
    retained_forged: int = 0  # copies on the coordinator's retained topics it did not publish
    retained_restored: int = 0  # of those, real ones published again
    partials_accepted: int = 0  # site aggregators' partial aggregates taken into a round
    partials_rejected: int = 0
    partial_signature_rejected: int = 0  # also counted in partials_rejected
    counted_twice: int = 0  # a device already counted (directly or in a partial) named again: refused
    last_rejection: str = ""

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}
