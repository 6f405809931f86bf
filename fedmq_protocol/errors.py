"""Errors raised while decoding or validating wire data."""


class ProtocolError(ValueError):
    """A payload or topic violates the wire protocol.

    The message always names what was wrong (field, topic, size) so a rejection can be
    logged and counted without a traceback.
    """
