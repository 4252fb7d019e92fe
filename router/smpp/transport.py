"""asyncio shells around :class:`SmppSession`: read -> feed -> act on events.

One ``asyncio.Protocol`` per connection (no task per PDU). Writes made while
handling one read are coalesced into a single ``writelines``. When the kernel
send buffer fills (a peer that does not read), we stop reading from it: the
memory a connection can hold stays bounded.

Subclasses implement ``on_request`` (and optionally ``on_response``,
``on_timeout``, ``on_reject``, ``on_idle``, ``on_closed``). Requests we send can be awaited
(``request()``) or fired with a callback (``send_request()``), the latter for
hot paths that must not allocate a future per PDU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from .constants import CommandId, Status
from .errors import LocalProtocolError, SmppError
from .pdu import EnquireLinkResp, Pdu, Unbind, UnbindResp, response_for
from .session import (
    EnquireLinkDue,
    Event,
    Idle,
    Reject,
    Request,
    Response,
    SmppSession,
    StrayResponse,
    Timeout,
)

ResponseCallback = Callable[[Pdu | None, Pdu], None]
"""Called with (response or None on timeout/disconnect, request)."""

_ENQUIRE_LINK = int(CommandId.ENQUIRE_LINK)
_UNBIND = int(CommandId.UNBIND)


class SmppProtocol(asyncio.Protocol):
    tick = 1.0  # seconds between timer polls

    def __init__(self, session: SmppSession, clock: Callable[[], float] = time.monotonic) -> None:
        self.session = session
        self.clock = clock
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[Any, ...] | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._waiters: dict[int, asyncio.Future[Pdu] | ResponseCallback] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._paused_reading = False
        self._writing_paused = False
        self._hold: asyncio.TimerHandle | None = None  # reading held until it fires
        self.closed: asyncio.Future[None] | None = None
        # Kept from connection_made: asyncio.get_running_loop() costs a getpid()
        # system call on Python 3.11, too much for once per PDU.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._window_waiters: list[asyncio.Future[None]] = []
        self._unbind_seq: int | None = None
        self._unbind_deadline = 0.0

    # ------------------------------------------------------------ lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; trust the API.
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.closed = loop.create_future()
        self.session.last_rx = self.clock()
        self._timer = loop.call_later(self.tick, self._on_tick)
        transport.set_write_buffer_limits(high=256 * 1024)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.close()
        if self._timer is not None:
            self._timer.cancel()
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        waiters, self._waiters = self._waiters, {}
        pending = {req.sequence: req for req in self.session.take_outstanding()}
        for seq, waiter in waiters.items():
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_exception(ConnectionError("SMPP connection lost"))
            elif seq in pending:
                waiter(None, pending[seq])
        self._wake_window_waiters()
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)
        self.on_closed(exc)

    def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    # ------------------------------------------------------------- reading

    def data_received(self, data: bytes) -> None:
        # What handling this read writes leaves in one write, by a callback
        # queued after the ones this read scheduled (e.g. a carrier's pump
        # sending the next submit_sm): answers and new requests share it.
        already = self._flush_scheduled
        self._flush_scheduled = True
        try:
            events = self.session.receive_data(data, self.clock())
            for event in events:
                self._dispatch(event)
        finally:
            if already:
                pass  # a flush is queued already and takes these writes too
            elif self._out and self._loop is not None:
                self._loop.call_soon(self._flush)
            else:
                self._flush()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Request):
            cid = event.pdu.command_id
            if cid == _ENQUIRE_LINK:
                self.send(EnquireLinkResp(sequence=event.pdu.sequence))
            elif cid == _UNBIND:
                # Answer what is still in flight first (a submit already taken
                # must get its submit_sm_resp, or the client resends it); new
                # requests get ESME_RINVBNDSTS from the session meanwhile.
                self._unbind_seq = event.pdu.sequence
                self._unbind_deadline = self.clock() + self.session.response_timeout
                self.on_unbind()
                self._maybe_finish_unbind()
            else:
                try:
                    self.on_request(event.pdu)
                except SmppError as exc:
                    self.answer(event.pdu, exc.status)
                except Exception as exc:  # a bug must cost one PDU, not the session
                    self.on_internal_error(event.pdu, exc)
                    self.answer(event.pdu, Status.ESME_RSYSERR)
        elif isinstance(event, Response):
            waiter = self._waiters.pop(event.request.sequence, None)
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_result(event.pdu)
            elif waiter is not None:
                waiter(event.pdu, event.request)
            else:
                self.on_response(event.pdu, event.request)
            if self._window_waiters:
                self._wake_window_waiters()
        elif isinstance(event, Reject):
            self.on_reject(event)
            if event.close:
                # The session is already closed: write the generic_nack as is.
                self._write(event.answer.encode())
                self.close()
            else:
                self.send(event.answer)
        elif isinstance(event, Timeout):
            waiter = self._waiters.pop(event.request.sequence, None)
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_exception(TimeoutError("no SMPP response in time"))
            elif waiter is not None:
                waiter(None, event.request)
            else:
                self.on_timeout(event.request)
            self._wake_window_waiters()
        elif isinstance(event, EnquireLinkDue):
            self._write(self.session.enquire_link(self.clock()))
        elif isinstance(event, Idle):
            self.on_idle()
        elif isinstance(event, StrayResponse):
            self.on_stray(event.pdu)

    def _on_tick(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._unbind_seq is not None and self.clock() >= self._unbind_deadline:
            self._maybe_finish_unbind(force=True)
            return
        try:
            for event in self.session.poll(self.clock()):
                self._dispatch(event)
        finally:
            self._flush()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.tick, self._on_tick)

    # ------------------------------------------------------------- writing

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            out, self._out = self._out, []
            self.transport.writelines(out)
        else:
            self._out.clear()

    def send(self, pdu: Pdu) -> None:
        """Send a PDU (response, or a request nobody waits for)."""
        if self.transport is None or self.transport.is_closing():
            return
        self._write(self.session.send(pdu, self.clock()))
        if self._unbind_seq is not None and pdu.is_response:
            self._maybe_finish_unbind()

    def _maybe_finish_unbind(self, force: bool = False) -> None:
        seq = self._unbind_seq
        if seq is None:
            return
        if force or self.session.peer_pending <= {seq}:
            self._unbind_seq = None
            if self.transport is not None and not self.transport.is_closing():
                self._write(self.session.send(UnbindResp(sequence=seq), self.clock()))
            self.close()

    def answer(self, request: Pdu, status: int = Status.ESME_ROK, **fields: Any) -> None:
        self.send(response_for(request, status, **fields))

    def send_request(self, pdu: Pdu, callback: ResponseCallback) -> None:
        """Send a request; ``callback(resp_or_None, request)`` fires exactly once."""
        if not self.is_open:
            raise ConnectionError("SMPP connection is closed")
        data = self.session.send(pdu, self.clock())
        self._waiters[pdu.sequence] = callback
        self._write(data)

    async def request(self, pdu: Pdu, wait_window: bool = True) -> Pdu:
        """Send a request and wait for its response (or TimeoutError/ConnectionError)."""
        while wait_window and not self.session.can_send:
            await self.wait_window()
        if not self.is_open:
            raise ConnectionError("SMPP connection is closed")
        fut: asyncio.Future[Pdu] = asyncio.get_running_loop().create_future()
        data = self.session.send(pdu, self.clock())
        self._waiters[pdu.sequence] = fut
        self._write(data)
        return await fut

    async def wait_window(self) -> None:
        if self.session.can_send or not self.is_open:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._window_waiters.append(fut)
        await fut

    def _wake_window_waiters(self) -> None:
        while self._window_waiters and (self.session.can_send or not self.is_open):
            fut = self._window_waiters.pop(0)
            if not fut.done():
                fut.set_result(None)

    async def unbind(self, timeout: float = 5.0) -> None:
        """Polite goodbye: unbind, wait for unbind_resp, close."""
        if self.is_open and self.session.bound:
            try:
                await asyncio.wait_for(self.request(Unbind(), wait_window=False), timeout)
            except (TimeoutError, ConnectionError, LocalProtocolError):
                pass
        self.close()

    # ---------------------------------------------- flow control (bounded memory)

    def pause_writing(self) -> None:
        # The peer is not reading our answers: stop reading its requests.
        self._writing_paused = True
        self._sync_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._sync_reading()

    def hold_reading(self, seconds: float) -> bool:
        """Read nothing more from the peer for ``seconds`` (what it sends
        waits in the kernel, then TCP flow control slows it). False if a
        hold is on already: it is not extended."""
        if self._hold is not None or seconds <= 0 or not self.is_open:
            return False
        loop = self._loop or asyncio.get_running_loop()
        self._hold = loop.call_later(seconds, self._end_hold)
        self._sync_reading()
        return True

    def _end_hold(self) -> None:
        self._hold = None
        self._sync_reading()

    def _sync_reading(self) -> None:
        """Read from the socket unless the peer does not read our writes or
        a hold is on."""
        pause = self._writing_paused or self._hold is not None
        if self.transport is None or pause == self._paused_reading:
            return
        if self.transport.is_closing():
            return
        self._paused_reading = pause
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # ------------------------------------------------------------- hooks

    def on_request(self, pdu: Pdu) -> None:
        raise SmppError("not supported", Status.ESME_RINVCMDID)

    def on_response(self, pdu: Pdu, request: Pdu) -> None:
        pass

    def on_timeout(self, request: Pdu) -> None:
        pass

    def on_reject(self, event: Reject) -> None:
        pass

    def on_stray(self, pdu: Pdu) -> None:
        pass

    def on_unbind(self) -> None:
        pass

    def on_internal_error(self, pdu: Pdu, exc: Exception) -> None:
        pass

    def on_idle(self) -> None:
        self.close()

    def on_closed(self, exc: Exception | None) -> None:
        pass
