"""A carrier bind held by a sibling worker process (``listen.workers``).

Many carrier accounts allow one or two binds at once. With more worker
processes than a carrier's ``sessions`` (router/workers.py), only as many
workers bind it as it allows; every other worker sends that carrier's
submit_sm through a sibling that holds a bind: the PDU goes over the
supervisor's control links, the sibling sends it on its own session
(waiting for room in that session's window) and the submit_sm_resp comes
back the same way.

On the relaying worker a :class:`RelaySession` stands in the carrier's
session list like a real bind, so everything the carrier does per message
stays as it is: its queue, its share of the carrier's ``tps``, retries,
failover, the correlation of carrier ids. A receipt for a relayed message
reaches the binding worker, which does not know its carrier id and offers
it to its siblings in memory, as any receipt of a message it did not send
(Engine.offer_receipt); the database path stays the fallback.

Nothing of a relayed message is written anywhere on the way: the PDU lives
in the two processes' memory and the socket buffers between them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from ..observe import metrics
from ..smpp.pdu import Pdu, decode
from ..smpp.transport import ResponseCallback

# Sends [rid, carrier, encoded submit_sm] to the supervisor (batched there).
Send = Callable[[int, str, bytes], None]


class RelaySession:
    """The part of a carrier session the Carrier's pump uses, relayed."""

    relayed = True

    def __init__(self, carrier: str, window: int, send: Send, clock: Callable[[], float]) -> None:
        self.carrier = carrier
        self.window = window
        self._send = send
        self._clock = clock
        self._pending: dict[int, tuple[Pdu, ResponseCallback, float]] = {}
        self._ids = itertools.count(1)
        self.is_open = True
        self.session = self  # the Carrier reads ``sess.session.can_send``

    @property
    def can_send(self) -> bool:
        return self.is_open and len(self._pending) < self.window

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def send_request(self, pdu: Pdu, callback: ResponseCallback) -> None:
        if not self.is_open:
            raise ConnectionError("the relaying sibling is gone")
        rid = next(self._ids)
        self._pending[rid] = (pdu, callback, self._clock())
        self._send(rid, self.carrier, pdu.encode())

    def answered(self, rid: int, data: bytes | None) -> None:
        """The sibling's answer: the encoded submit_sm_resp, or None when it
        had no bound session or no answer came (the carrier retries)."""
        entry = self._pending.pop(rid, None)
        if entry is None:
            return  # timed out before, and already retried
        request, callback, _ = entry
        resp = None
        if data is not None:
            try:
                resp = decode(data)
            except Exception:  # a defect, not the carrier's answer: retried
                resp = None
        metrics.child(metrics.WORKER_RELAYED, "no_answer" if resp is None else "answered").inc()
        callback(resp, request)

    def expire(self, older_than: float) -> None:
        """Requests unanswered since before ``older_than`` (the sibling died
        or the supervisor is gone): no answer, so the carrier resends them."""
        stale = [rid for rid, (_, _, at) in self._pending.items() if at < older_than]
        for rid in stale:
            self.answered(rid, None)

    def close(self) -> None:
        """No sibling holds a bind any more: what is in flight is resent
        once one does (or failed over, like any carrier that went down)."""
        self.is_open = False
        for rid in list(self._pending):
            self.answered(rid, None)

    async def unbind(self, timeout: float = 1.0) -> None:
        self.close()
