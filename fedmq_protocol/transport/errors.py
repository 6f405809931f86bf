"""Transport exceptions: one line naming the broker URL and the reason."""

from __future__ import annotations


class TransportError(RuntimeError):
    """The broker could not be reached or did not accept/acknowledge something in time.

    The message is one line naming the broker URL and the reason.
    """


class SubscriptionRefused(TransportError):
    """The broker answered a SUBSCRIBE with a failure reason code (the subscription is dropped)."""
