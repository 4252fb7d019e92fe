"""Typed SMPP errors. Each carries the command_status to answer with.

Messages name fields and sizes, never field contents: a PDU carries phone
numbers and text, which must not reach logs (see privacy.md).
"""

from __future__ import annotations

from .constants import Status


class SmppError(Exception):
    """Base class; ``status`` is the command_status that describes the fault."""

    status: int = Status.ESME_RSYSERR

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class RemoteProtocolError(SmppError):
    """The peer sent something that breaks SMPP framing or PDU syntax."""


class FramingError(RemoteProtocolError):
    """command_length is impossible: the byte stream cannot be resynchronised.

    The only sound reaction is generic_nack (ESME_RINVCMDLEN) and closing the
    connection, because the next PDU boundary is unknown.
    """

    status = Status.ESME_RINVCMDLEN


class LocalProtocolError(SmppError):
    """We were asked to send something SMPP does not allow in this state."""
