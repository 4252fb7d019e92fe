"""Carrier egress: SMPP sessions to carriers, each carrier with a bounded
queue, a window, a shared token bucket, reconnects with jittered backoff,
retries of temporary errors that never block the queue, and correlation of
carrier message ids back to ours.

Knows nothing of HTTP or customer binds: results leave through the
:class:`CarrierEvents` callbacks. Never logs numbers or text.
"""

from .carrier import Carrier, CarrierEvents, Submission

__all__ = ["Carrier", "CarrierEvents", "Submission"]
