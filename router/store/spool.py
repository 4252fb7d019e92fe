"""The spool: what makes "accepted" mean "will be delivered" (at-least-once).

``add`` buffers a message; writer tasks (two by default) COPY buffered rows,
a batch per transaction (group commit), and only then call each message's
callback, so the submitter's positive answer comes after the message is
durable. A message that cannot be written within ``write_deadline`` of its
``add`` is refused instead (its submitter gets ESME_RSYSERR or HTTP 503
``not-durable`` with Retry-After: engine._not_durable).
``taken`` batches the DELETE of rows a carrier has accepted. After a crash,
``load`` returns every message still in the spool to be sent again;
duplicates are possible only where a carrier took a message and the router
died before recording it.

Secret messages are encrypted (AES-256-GCM, key from ROUTER_SPOOL_KEY,
never stored beside the data); without a key they are not spooled at all and
live in memory only (at-most-once for them), which start-up warns about.
``MemorySpool`` is the documented "in-memory" mode: faster, loses on crash.
Never logs message content or addresses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import itertools
import json
import os
import struct
import time
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any

import asyncpg
import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..carriers.receipt import normalise_carrier_id
from ..model import Message, MessageClass, Origin
from ..observe import metrics
from ..tasks import DB_ERRORS, is_data_error
from .db import copy_dropping_refused, holds_session_state
from .trafficlog import FINAL_STATUSES

log = structlog.get_logger("router.spool")

# A node's liveness: a session advisory lock on this prefix + its id.
_NODE_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('sms-router-node:' || $1, 0))"
_NODE_XACT_LOCK = "SELECT pg_try_advisory_xact_lock(hashtextextended('sms-router-node:' || $1, 0))"
_NODE_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('sms-router-node:' || $1, 0))"


class NodeInUse(RuntimeError):
    """Another running router holds this node id."""


def _conn_lost(conn: asyncpg.pool.PoolConnectionProxy) -> bool:
    """A held pool connection whose link to the server is gone. asyncpg
    (0.32) hands such a connection back to its pool by itself and detaches
    the proxy: every call on it then raises InterfaceError, is_closed() too."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


DurableCallback = Callable[[bool], None]
_Add = tuple[tuple[Any, ...], DurableCallback, float]
"""A message waiting to be durable: (spool row, callback, monotonic time of add)."""
SPOOL_COLUMNS = (
    "id",
    "account_id",
    "class",
    "created_at",
    "expires_at",
    "encrypted",
    "payload",
    "due_at",
    "node",
)
ROUTE_COLUMNS = (
    "carrier",
    "carrier_id",
    "message_id",
    "part",
    "parts",
    "account_id",
    "account",
    "origin",
    "class",
    "country",
    "registered_delivery",
    "accepted_at",
    "info",
    "node",
    "expect_by",
)
_UTC = dt.UTC


def load_key(raw: str | None) -> bytes | None:
    """ROUTER_SPOOL_KEY: 32 bytes as 64 hex chars or urlsafe base64."""
    if not raw:
        return None
    raw = raw.strip()
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    if len(key) != 32:
        raise ValueError("ROUTER_SPOOL_KEY must be 32 bytes (64 hex characters)")
    return key


# Spool payload formats. decode_message reads both, whatever wrote the row.
#
# 1 (JSON, the format before 2): a UTF-8 JSON object, octets as base64;
#   always starts with "{". Still written for a message format 2 cannot hold
#   (an integer beyond 64 bits, a field of an unexpected type).
# 2 (binary): the octet 0x02, then _BIN_FIXED (little-endian): version,
#   flags, account_id, source_ton, source_npi, data_coding, esm_class,
#   registered_delivery (int64 each), accepted_at, expires_at, send_at
#   (float64; send_at 0 when absent), then the counts of segments, TLVs and
#   part ids (uint16 each); then one uint32 per item of the variable part:
#   the lengths of id, account, origin, class, source, destination, country,
#   text, userref, callback_url (UTF-8; absent ones have length 0 and a
#   clear flag bit), of each segment, a (tag, length) pair
#   per TLV, the length of each part id; then those items' octets, in order.
#   About 6x cheaper to write than format 1 (no base64, no JSON escaping).
_BIN_VERSION = 2
_BIN_FIXED = struct.Struct("<BBqqqqqqdddHHH")
_F_TEXT, _F_USERREF, _F_CALLBACK, _F_SEND_AT, _F_HELD = 1, 2, 4, 8, 16
_LENGTHS: dict[int, struct.Struct] = {}
_ORIGINS = {o.value: o for o in Origin}
_CLASSES = {c.value: c for c in MessageClass}
_ORIGIN_OCTETS = {o: o.value.encode() for o in Origin}
_CLASS_OCTETS = {c: c.value.encode() for c in MessageClass}
_CLASS_VALUES = {c: c.value for c in MessageClass}


def _lengths(n: int) -> struct.Struct:
    st = _LENGTHS.get(n)
    if st is None:
        st = struct.Struct(f"<{n}I")
        if len(_LENGTHS) < 256:
            _LENGTHS[n] = st
    return st


def encode_message(msg: Message) -> bytes:
    """The spool payload of a message (format 2; format 1 if 2 cannot hold it)."""
    try:
        return _encode_binary(msg)
    except (struct.error, AttributeError, TypeError, ValueError, LookupError, OverflowError):
        return _encode_json(msg)  # UnicodeEncodeError (a lone surrogate) included


def _encode_binary(msg: Message) -> bytes:
    text = msg.text
    userref = msg.userref
    callback = msg.callback_url
    send_at = msg.send_at
    flags = (
        (text is not None)
        | (userref is not None) << 1
        | (callback is not None) << 2
        | (send_at is not None) << 3
        | bool(msg.held) << 4
    )
    items = [
        msg.id.encode(),
        msg.account.encode(),
        _ORIGIN_OCTETS[msg.origin],
        _CLASS_OCTETS[msg.msg_class],
        msg.source.encode(),
        msg.destination.encode(),
        msg.country.encode(),
        b"" if text is None else text.encode(),
        b"" if userref is None else userref.encode(),
        b"" if callback is None else callback.encode(),
    ]
    lengths = [len(i) for i in items]
    segments = msg.segments
    for seg in segments:
        lengths.append(len(seg))
        items.append(seg)
    tlvs = msg.tlvs
    for tag, value in tlvs:
        lengths.append(tag)
        lengths.append(len(value))
        items.append(value)
    part_ids = msg.part_ids
    for pid in part_ids:
        raw = pid.encode()
        lengths.append(len(raw))
        items.append(raw)
    head = _BIN_FIXED.pack(
        _BIN_VERSION,
        flags,
        msg.account_id,
        msg.source_ton,
        msg.source_npi,
        msg.data_coding,
        msg.esm_class,
        msg.registered_delivery,
        msg.accepted_at,
        msg.expires_at,
        0.0 if send_at is None else send_at,
        len(segments),
        len(tlvs),
        len(part_ids),
    )
    return b"".join((head, _lengths(len(lengths)).pack(*lengths), *items))


def _encode_json(msg: Message) -> bytes:
    return json.dumps(
        {
            "id": msg.id,
            "account_id": msg.account_id,
            "account": msg.account,
            "origin": msg.origin.value,
            "class": msg.msg_class.value,
            "source": msg.source,
            "source_ton": msg.source_ton,
            "source_npi": msg.source_npi,
            "destination": msg.destination,
            "country": msg.country,
            "data_coding": msg.data_coding,
            "esm_class": msg.esm_class,
            "segments": [base64.b64encode(s).decode() for s in msg.segments],
            "text": msg.text,
            "registered_delivery": msg.registered_delivery,
            "accepted_at": msg.accepted_at,
            "expires_at": msg.expires_at,
            "userref": msg.userref,
            "callback_url": msg.callback_url,
            "tlvs": [[t, base64.b64encode(v).decode()] for t, v in msg.tlvs],
            "send_at": msg.send_at,
            "part_ids": list(msg.part_ids),
            "held": msg.held,
        },
        separators=(",", ":"),
    ).encode()


def decode_message(raw: bytes) -> Message:
    """A message from its spool payload, format 2 (binary) or 1 (JSON)."""
    if raw[:1] == b"\x02":
        return _decode_binary(raw)
    return _decode_json(raw)


def _decode_binary(raw: bytes) -> Message:
    (
        _,
        flags,
        account_id,
        source_ton,
        source_npi,
        data_coding,
        esm_class,
        registered_delivery,
        accepted_at,
        expires_at,
        send_at,
        n_segments,
        n_tlvs,
        n_part_ids,
    ) = _BIN_FIXED.unpack_from(raw, 0)
    count = 10 + n_segments + 2 * n_tlvs + n_part_ids
    pos = _BIN_FIXED.size
    lengths = _lengths(count).unpack_from(raw, pos)
    pos += 4 * count

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(raw):
            raise ValueError("spool payload is truncated")
        out = raw[pos : pos + n]
        pos += n
        return out

    strs = [take(n).decode() for n in lengths[:10]]
    segments = tuple(take(n) for n in lengths[10 : 10 + n_segments])
    i = 10 + n_segments
    tlvs = []
    for _ in range(n_tlvs):
        tlvs.append((lengths[i], take(lengths[i + 1])))
        i += 2
    part_ids = tuple(take(n).decode() for n in lengths[i:])
    if pos != len(raw):
        raise ValueError("spool payload has trailing octets")
    origin = _ORIGINS.get(strs[2]) or Origin(strs[2])
    msg_class = _CLASSES.get(strs[3]) or MessageClass(strs[3])
    return Message(
        id=strs[0],
        account_id=account_id,
        account=strs[1],
        origin=origin,
        msg_class=msg_class,
        source=strs[4],
        source_ton=source_ton,
        source_npi=source_npi,
        destination=strs[5],
        country=strs[6],
        data_coding=data_coding,
        esm_class=esm_class,
        segments=segments,
        text=strs[7] if flags & _F_TEXT else None,
        registered_delivery=registered_delivery,
        accepted_at=accepted_at,
        expires_at=expires_at,
        userref=strs[8] if flags & _F_USERREF else None,
        callback_url=strs[9] if flags & _F_CALLBACK else None,
        tlvs=tuple(tlvs),
        send_at=send_at if flags & _F_SEND_AT else None,
        part_ids=part_ids,
        held=bool(flags & _F_HELD),
    )


def _decode_json(raw: bytes) -> Message:
    d = json.loads(raw)
    return Message(
        id=d["id"],
        account_id=d["account_id"],
        account=d["account"],
        origin=Origin(d["origin"]),
        msg_class=MessageClass(d["class"]),
        source=d["source"],
        source_ton=d["source_ton"],
        source_npi=d["source_npi"],
        destination=d["destination"],
        country=d["country"],
        data_coding=d["data_coding"],
        esm_class=d["esm_class"],
        segments=tuple(base64.b64decode(s) for s in d["segments"]),
        text=d["text"],
        registered_delivery=d["registered_delivery"],
        accepted_at=d["accepted_at"],
        expires_at=d["expires_at"],
        userref=d["userref"],
        callback_url=d["callback_url"],
        tlvs=tuple((t, base64.b64decode(v)) for t, v in d["tlvs"]),
        send_at=d.get("send_at"),
        part_ids=tuple(d.get("part_ids", ())),
        held=d.get("held", False),
    )


def _fresh_routes(
    routes: list[tuple[Any, ...]], route_deletes: list[tuple[str, str]]
) -> list[tuple[Any, ...]]:
    """The routes to write: the last one of each (carrier, carrier id), none
    whose receipt has come already."""
    done = set(route_deletes)
    newest: dict[tuple[str, str], tuple[Any, ...]] = {}
    for r in routes:
        key = (r[0], r[1])
        if key not in done:
            newest[key] = r
    return list(newest.values())


class MemorySpool:
    """delivery_guarantee = "in-memory": nothing survives a crash."""

    durable = False

    def add(self, msg: Message, done: DurableCallback) -> None:
        done(True)

    def taken(self, message_id: str) -> None:
        pass

    def remember_route(self, carrier: str, carrier_id: str, msg: Message, part: int) -> None:
        pass

    def forget_route(self, carrier: str, carrier_id: str) -> None:
        pass

    @property
    def size(self) -> int:
        return 0

    def start(self) -> None:
        pass

    async def close(self, timeout: float = 5.0) -> None:
        pass

    async def load(self) -> list[Message]:
        return []


def _json_or_null(s: str | None) -> str:
    return "null" if s is None else _json_str(s)


def route_info(msg: Message) -> str:
    """What a receipt to the customer needs of a message, as the JSON text
    of ``receipt_routes.info``: exactly ``json.dumps`` of those six fields
    (tests/test_spool.py compares them), built from json's own C string
    encoder at 0.4 us against 2.7 us for json.dumps of a dict (once per
    message part on the hot path; measured 2026-12-07). A message
    reassembled from customer parts adds their ids and registered_delivery
    (``part_ids``, ``part_receipts``): one receipt per part id."""
    info = (
        f'{{"source": {_json_str(msg.source)}, "source_ton": {int(msg.source_ton)}, '
        f'"source_npi": {int(msg.source_npi)}, "destination": {_json_str(msg.destination)}, '
        f'"userref": {_json_or_null(msg.userref)}, '
        f'"callback_url": {_json_or_null(msg.callback_url)}'
    )
    if msg.part_ids:
        info += ", " + _parts_info(msg)[1:-1]
    return info + "}"


def _parts_info(msg: Message) -> str:
    """The part ids of a reassembled message, as JSON: not personal data,
    so kept for secret messages too (their route has no other info)."""
    return json.dumps({"part_ids": msg.part_ids, "part_receipts": msg.part_receipts})


def _with_final(alias: str) -> str:
    """The join that gives a receipt route row the newest final status the
    traffic log holds for its message (delivery_events, indexed by
    message_id; $5 = FINAL_STATUSES): where a route may have outlived its
    message's final receipt (claim_overdue_routes, finished_routes)."""
    return (
        " LEFT JOIN LATERAL (SELECT e.status AS final_status, e.error AS final_error,"
        " e.carrier AS final_carrier, e.at AS final_at FROM delivery_events e"
        f" WHERE e.message_id = {alias}.message_id AND e.status = ANY($5::text[])"
        " ORDER BY e.at DESC LIMIT 1) final ON true"
    )


class PgSpool:
    durable = True

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        key: bytes | None,
        max_rows: int = 1_000_000,
        flush_interval: float = 0.002,
        batch: int = 5_000,
        write_deadline: float = 5.0,
        writers: int = 2,
        node: str = "local",
        node_grace: float = 30.0,
        node_wait: float = 10.0,
        receipt_timeout: float = 3600.0,
        probe_interval: float = 1.0,
    ) -> None:
        self.pool = pool
        # A route's receipt is expected until its message's validity ends
        # plus this (then router/carriers/deadline.py finishes it 'unknown').
        self.receipt_timeout = receipt_timeout
        self.aead = AESGCM(key) if key else None
        # This router's id among the nodes sharing the database (see load()).
        self.node = node
        self.node_grace = node_grace
        self.node_wait = node_wait
        self._node_conn: asyncpg.pool.PoolConnectionProxy | None = None
        self._nodes_task: asyncio.Task[None] | None = None
        # Called with the messages adopted from a dead node (the engine queues them).
        self.on_adopt: Callable[[list[Message]], object] | None = None
        # Called with the name of each dead node adopted (its receipts that
        # a crash left unsent are sent again: ReceiptDeadlines.resend_for).
        self.on_adopt_node: Callable[[str, dt.datetime], object] | None = None
        # (node, when) adopted before on_adopt_node was set
        self.adopted_nodes: list[tuple[str, dt.datetime]] = []
        self.max_rows = max_rows
        self.flush_interval = flush_interval
        self.batch = batch
        self.write_deadline = write_deadline
        self.writers = max(1, writers)
        self._adds: list[_Add] = []  # waiting for a writer
        self._deletes: list[str] = []
        self._routes: list[tuple[Any, ...]] = []
        self._route_deletes: list[tuple[str, str]] = []
        self._wake = asyncio.Event()  # the first message is waiting (or closing)
        self._full = asyncio.Event()  # a whole batch is waiting (or closing)
        self._writer_tasks: list[asyncio.Task[None]] = []
        self._upkeep: asyncio.Task[None] | None = None
        self._closing = False
        self._writing = 0  # rows inside a COPY that has not committed yet
        self._in_flight: dict[int, list[_Add]] = {}  # those rows, by batch
        self._batch_keys = itertools.count()
        self.rows = 0  # approximate rows in the table (for the bound and the metric)
        # The last write reached the database (/readyz). Set by the writers;
        # while False, the upkeep task probes every probe_interval (_probe).
        self.healthy = True
        self.probe_interval = probe_interval
        self._probe_at = 0.0
        self._write_failures = 0

    @property
    def size(self) -> int:
        return self.rows + self._writing + len(self._adds)

    def has_room(self, n: int = 1) -> bool:
        return self.size + n <= self.max_rows

    # ------------------------------------------------------------- hot path

    def add(self, msg: Message, done: DurableCallback) -> None:
        if msg.secret:
            if self.aead is None:
                done(True)  # memory only; see module docstring
                return
            nonce = os.urandom(12)
            payload = nonce + self.aead.encrypt(nonce, encode_message(msg), msg.id.encode())
            encrypted = True
        else:
            payload = encode_message(msg)
            encrypted = False
        row = (
            msg.id,
            msg.account_id,
            _CLASS_VALUES[msg.msg_class],
            dt.datetime.fromtimestamp(msg.accepted_at, _UTC),
            dt.datetime.fromtimestamp(msg.expires_at, _UTC),
            encrypted,
            payload,
            None if msg.send_at is None else dt.datetime.fromtimestamp(msg.send_at, _UTC),
            self.node,
        )
        self._adds.append((row, done, time.monotonic()))
        n = len(self._adds)
        if n == 1:
            self._wake.set()
        if n >= self.batch:
            self._full.set()

    def taken(self, message_id: str) -> None:
        self._deletes.append(message_id)

    def remember_route(self, carrier: str, carrier_id: str, msg: Message, part: int) -> None:
        """Persist carrier id -> message for receipts that come after a restart."""
        if not msg.secret:
            info: str | None = route_info(msg)
        else:
            info = _parts_info(msg) if msg.part_ids else None
        self._routes.append(
            (
                carrier,
                normalise_carrier_id(carrier_id),
                msg.id,
                part,
                msg.parts,
                msg.account_id,
                msg.account,
                msg.origin.value,
                msg.msg_class.value,
                msg.country,
                msg.registered_delivery,
                dt.datetime.fromtimestamp(msg.accepted_at, _UTC),
                info,
                self.node,
                # A carrier takes a message only before its validity ends.
                dt.datetime.fromtimestamp(msg.expires_at + self.receipt_timeout, _UTC),
            )
        )

    def forget_route(self, carrier: str, carrier_id: str) -> None:
        self._route_deletes.append((carrier, normalise_carrier_id(carrier_id)))

    async def find_routes(
        self, wanted: Sequence[tuple[str, list[str]]]
    ) -> list[asyncpg.Record | None]:
        """The receipt_routes row of each (carrier, forms of a carrier id), or
        None; one query for all of them."""
        idx: list[int] = []
        carriers: list[str] = []
        ids: list[str] = []
        for i, (carrier, forms) in enumerate(wanted):
            for f in forms:
                idx.append(i)
                carriers.append(carrier)
                ids.append(f)
        # LATERAL: a primary-key probe per id. A plain join let the planner
        # hash-join over a scan of this insert/delete-churned table
        # (measured: ~100 ms per 200 receipts under load).
        rows = await self.pool.fetch(
            "SELECT q.i, r.* FROM unnest($1::int[], $2::text[], $3::text[])"
            " AS q(i, carrier, carrier_id) CROSS JOIN LATERAL (SELECT * FROM receipt_routes"
            " WHERE carrier = q.carrier AND carrier_id = q.carrier_id) r",
            idx,
            carriers,
            ids,
        )
        out: list[asyncpg.Record | None] = [None] * len(wanted)
        for r in rows:
            if out[r["i"]] is None:
                out[r["i"]] = r
        return out

    async def claim_overdue_routes(
        self, live_nodes: Sequence[str], limit: int = 1000, lease: float = 300.0
    ) -> list[asyncpg.Record]:
        """Claim and return the receipt routes of up to ``limit`` messages
        that have a route past its ``expect_by`` (all of each message's
        routes, so that a message is finished once). Only routes of this
        node, of no node, or of a node not in ``live_nodes``: a live node
        finishes its own (it may hold the message in memory).

        The claim is a lease, not a delete: ``expect_by`` moves ``lease``
        seconds ahead. The caller finishes the message and then forgets its
        routes (forget_route), so they go in the upkeep's next round. If the
        finish never runs (the node dies, or the answer is lost with its
        connection), the routes are overdue again when the lease ends and
        the message is finished then. Concurrent callers on other nodes
        never get the same row: the
        second waits for the first's row lock, then finds ``expect_by`` no
        longer past."""
        return list(
            await self.pool.fetch(
                "WITH claimed AS ("
                " UPDATE receipt_routes SET expect_by = now() + make_interval(secs => $4)"
                " WHERE expect_by < now() AND message_id IN ("
                " SELECT message_id FROM receipt_routes WHERE expect_by < now()"
                "  AND (node IS NULL OR node = $1 OR NOT (node = ANY($2::text[])))"
                "  ORDER BY expect_by LIMIT $3)"
                " RETURNING *)"
                " SELECT claimed.*, final.* FROM claimed" + _with_final("claimed"),
                self.node,
                list(live_nodes),
                limit,
                lease,
                FINAL_STATUSES,
            )
        )

    async def finished_routes(
        self, before: dt.datetime, after: str = "", limit: int = 1000, node: str | None = None
    ) -> list[asyncpg.Record]:
        """The receipt routes this node (or ``node``, a dead one just
        adopted) wrote before ``before`` (its previous life), of up to
        ``limit`` messages with ids after ``after``, in id order: each row
        with the final status the traffic log holds for its message
        (``final_status`` etc.; NULL if none). A route whose message has one
        outlived its final receipt: the router went down between logging
        the status and deleting the route (router/carriers/deadline.py)."""
        return list(
            await self.pool.fetch(
                "WITH page AS ("
                " SELECT DISTINCT message_id FROM receipt_routes"
                " WHERE node = $1 AND created_at < $2 AND message_id > $3"
                " ORDER BY message_id LIMIT $4)"
                " SELECT r.*, final.* FROM page JOIN receipt_routes r"
                "  ON r.message_id = page.message_id AND r.node = $1 AND r.created_at < $2"
                + _with_final("r")
                + " ORDER BY r.message_id",
                node or self.node,
                before,
                after,
                limit,
                FINAL_STATUSES,
            )
        )

    async def remaining_parts(self, message_id: str) -> int:
        return int(
            await self.pool.fetchval(
                "SELECT count(*) FROM receipt_routes WHERE message_id = $1", message_id
            )
        )

    # --------------------------------------------------------------- writer

    def start(self) -> None:
        if not self._writer_tasks:
            self._writer_tasks = [
                asyncio.create_task(self._run_adds(), name=f"spool-writer-{i}")
                for i in range(self.writers)
            ]
            self._upkeep = asyncio.create_task(self._run_upkeep(), name="spool-upkeep")
        if self._node_conn is not None and self._nodes_task is None:
            self._nodes_task = asyncio.create_task(self._run_nodes(), name="spool-nodes")

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is waiting (bounded by ``timeout`` in all) and stop;
        every message not durable by then is answered False, once."""
        self._closing = True
        self._wake.set()
        self._full.set()
        tasks = [t for t in (*self._writer_tasks, self._upkeep) if t is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                log.error("spool_close_timeout", waiting=len(self._adds) + self._writing)
                for task in pending:
                    task.cancel()
                # A cancelled COPY may still be releasing its connection;
                # its batch is answered below either way.
                await asyncio.wait(pending, timeout=1.0)
        self._writer_tasks = []
        self._upkeep = None
        # Anything still unwritten was never acknowledged: tell the submitters.
        waiting, self._adds = self._adds, []
        for key in list(self._in_flight):
            waiting.extend(self._settle_batch(key) or ())
        for _, cb, _ in waiting:
            cb(False)
        await self._leave()

    def _settle_batch(self, key: int) -> list[_Add] | None:
        """Take a batch out of flight; None if close() has answered it."""
        adds = self._in_flight.pop(key, None)
        if adds is not None:
            self._writing -= len(adds)
        return adds

    def _refuse_overdue(self) -> None:
        """After a failed write: refuse what has waited longer than
        ``write_deadline`` since its add (everything when closing), rather
        than leave its submitter waiting. Batches in a COPY are answered by
        their writer."""
        if self._closing:
            overdue, self._adds = self._adds, []
        else:
            cutoff = time.monotonic() - self.write_deadline
            overdue = [a for a in self._adds if a[2] < cutoff]
            if overdue:
                self._adds = [a for a in self._adds if a[2] >= cutoff]
        for _, cb, _ in overdue:
            cb(False)

    async def _copy(self, adds: list[_Add]) -> None:
        async with self.pool.acquire() as conn:
            try:
                await conn.copy_records_to_table(
                    "spool", records=[a[0] for a in adds], columns=SPOOL_COLUMNS
                )
            except asyncpg.UniqueViolationError:
                # An earlier COPY of some of these committed although its
                # writer saw an error (connection lost after COMMIT, or
                # cancelled while committing): those rows are durable. Ids
                # are unique per message, so the rows found are these.
                ids = [a[0][0] for a in adds]
                found = await conn.fetch("SELECT id FROM spool WHERE id = ANY($1::text[])", ids)
                there = {r["id"] for r in found}
                rest = [a[0] for a in adds if a[0][0] not in there]
                log.warning("spool_rows_already_written", rows=len(there))
                if rest:
                    await conn.copy_records_to_table("spool", records=rest, columns=SPOOL_COLUMNS)

    async def _run_adds(self) -> None:
        """Group commit of new messages, the only write a submitter waits
        for: its own connection and transaction, so it never queues behind
        the deletes and receipt-route upkeep (which run in _run_upkeep).

        ``writers`` of these run at once, each taking the batch waiting when
        it is free: what arrives while one COPY commits goes out in the next
        one within ``flush_interval`` instead of waiting for the first to
        finish (measured: one writer committing ~540 rows per 32 ms COPY kept
        the submit answer waiting ~1.5 COPYs on average). A batch is always
        in exactly one place: waiting in ``_adds`` or in flight in
        ``_in_flight``, so each message is answered exactly once. A writer
        never dies of a failed write, whatever the error.

        An idle writer waits for the first message (no timed poll: that
        woke each writer every ``flush_interval`` for nothing); the batch
        then gathers until ``flush_interval`` after its oldest message, or
        at once if a writer comes free later than that. With 2 ms instead
        of a 5 ms poll: smpp-e2e +4 % in two interleaved pairs (9.4k/9.2k
        -> 9.8k/9.5k msg/s), PostgreSQL CPU per message 47 -> 35 us, one
        bind level (7.3k/7.2k both); with this loop and 5 ms, one bind lost
        16 % (every batch waited the full 5 ms; the poll's phase averaged
        half of it) (2026-12-07).

        Tried on 2026-12-07 and not kept: writers holding their connection
        between batches, and answering a batch before its connection's
        release (then a reset round trip each, since skipped for these
        connections: router.store.db._reset): interleaved runs showed no
        gain beyond this VM's run-to-run noise."""
        while True:
            if not self._adds:
                if self._closing:
                    return
                # Idle: no wake-up until a message comes (a timed poll here
                # woke each writer every flush_interval for nothing).
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._closing and len(self._adds) < self.batch:
                # Group commit: what comes within flush_interval of the
                # oldest waiting message goes in one COPY; a writer that
                # comes free later than that takes them at once.
                wait = self.flush_interval - (time.monotonic() - self._adds[0][2])
                if wait > 0:
                    self._full.clear()
                    try:
                        await asyncio.wait_for(self._full.wait(), wait)
                    except TimeoutError:
                        pass
                    if not self._adds:
                        continue  # the other writer took them
            adds = self._adds[: self.batch]
            del self._adds[: len(adds)]
            key = next(self._batch_keys)
            self._in_flight[key] = adds
            self._writing += len(adds)
            try:
                await self._copy(adds)
            except Exception as exc:
                # Any failure, not only the database's (DB_ERRORS): a writer
                # that died would leave every later submitter waiting.
                if self._settle_batch(key) is not None:
                    self._adds[:0] = adds  # first in line again
                self.healthy = False
                self._write_failures += 1
                (log.warning if isinstance(exc, DB_ERRORS) else log.error)(
                    "spool_write_failed", error=type(exc).__name__, waiting=len(self._adds)
                )
                self._refuse_overdue()
                if self._closing:
                    return
                await asyncio.sleep(0.1)
                continue
            except BaseException:
                if self._settle_batch(key) is not None:
                    self._adds[:0] = adds  # cancelled: close() answers them
                raise
            if self._settle_batch(key) is None:
                continue  # close() gave up on it and answered it already
            self.healthy = True
            self.rows += len(adds)
            metrics.SPOOL_ROWS.set(self.rows)
            for _, cb, _ in adds:
                cb(True)

    async def _run_upkeep(self) -> None:
        """Deletes of rows carriers have taken and receipt-route changes, in
        batches. Every delete follows its row's commit (a message reaches a
        carrier only once durable), so the row writers and this one cannot
        reorder a row's life. Nothing waits on these; on failure they are retried.

        A round is two statements, each its own transaction: one that
        deletes the spool rows of the previous round and the routes whose
        receipt came (and those of carrier ids used again: the newest route
        wins), then the COPY of the new routes. Each await costs a loop
        iteration of a busy router, so the former transaction (BEGIN, three
        DELETEs, the COPY, COMMIT) took ~0.19 s a round under load
        (measured, smpp-e2e-2nodes-shared), and other nodes waited that long
        for a route. A spool row is deleted one round after the COPY of its
        routes committed, so a crash never leaves a row gone and its route
        unwritten (the message would neither be resent nor its receipt
        matched). A route whose receipt came in the same round is not written."""
        ready: list[str] = []  # spool rows whose routes have committed
        while True:
            if not self._closing:
                await asyncio.sleep(self.flush_interval)
                if not self.healthy and not self._adds and not self._in_flight:
                    await self._probe()
            if not (ready or self._deletes or self._routes or self._route_deletes):
                if self._closing and all(t.done() for t in self._writer_tasks):
                    return
                if self._closing:
                    await asyncio.sleep(self.flush_interval)
                continue
            cap = self.batch * 4
            deletes = self._deletes[:cap]
            routes = self._routes[:cap]
            route_deletes = self._route_deletes[:cap]
            later: list[tuple[str, str]] = []
            if len(self._routes) > cap:
                # A receipt whose route is not written yet (beyond this round):
                # its delete waits for the round that writes the route, or
                # the route would be left behind for good.
                unwritten = {(r[0], r[1]) for r in self._routes[cap:]}
                later = [k for k in route_deletes if k in unwritten]
                if later:
                    route_deletes = [k for k in route_deletes if k not in unwritten]
            fresh = _fresh_routes(routes, route_deletes)
            gone = route_deletes + [(r[0], r[1]) for r in fresh]
            try:
                async with self.pool.acquire() as conn:
                    if ready or gone:
                        await conn.execute(
                            "WITH taken AS (DELETE FROM spool WHERE id = ANY($1::text[]))"
                            " DELETE FROM receipt_routes WHERE (carrier, carrier_id) IN"
                            " (SELECT * FROM unnest($2::text[], $3::text[]))",
                            ready,
                            [c for c, _ in gone],
                            [i for _, i in gone],
                        )
                        self.rows = max(self.rows - len(ready), 0)
                        metrics.SPOOL_ROWS.set(self.rows)
                        ready = []
                    if fresh:
                        await self._copy_routes(conn, fresh)
            except DB_ERRORS as exc:
                log.warning("spool_upkeep_failed", error=type(exc).__name__)
                if self._closing:
                    return
                await asyncio.sleep(0.1)
                continue
            del self._deletes[: len(deletes)]
            del self._routes[: len(routes)]
            del self._route_deletes[: len(route_deletes) + len(later)]
            self._route_deletes[:0] = later
            ready = deletes

    async def _copy_routes(
        self, conn: asyncpg.pool.PoolConnectionProxy, rows: list[tuple[Any, ...]]
    ) -> None:
        """COPY new receipt routes: one statement. A route PostgreSQL
        refuses would fail it at every round, so that no spool row would be
        deleted again: the others are then written and it is dropped
        (counted; its receipt still matches while the message is in memory)."""
        try:
            await conn.copy_records_to_table("receipt_routes", records=rows, columns=ROUTE_COLUMNS)
            return
        except DB_ERRORS as exc:
            if not is_data_error(exc):
                raise
        async with conn.transaction():
            refused = await copy_dropping_refused(conn, "receipt_routes", rows, ROUTE_COLUMNS)
        if refused:
            metrics.RECEIPT_ROUTES_REFUSED.inc(refused)
            log.error("receipt_routes_refused", routes=refused)

    async def _probe(self) -> None:
        """After failed writes, with nothing waiting to be written (else
        the writers' retries tell): can the spool be written again? Without
        this, ``healthy`` (and /readyz) came back only with the next
        successful write, and a node that /readyz took out of its load
        balancer got no message to write: not ready for good. At most every
        ``probe_interval``, bounded by it: the table must be there and
        insertable, the server not a (read-only) standby. A write failing
        meanwhile keeps the spool unhealthy."""
        now = time.monotonic()
        if now < self._probe_at:
            return
        self._probe_at = now + self.probe_interval
        failures = self._write_failures
        try:
            async with asyncio.timeout(self.probe_interval):
                writable = await self.pool.fetchval(
                    "SELECT NOT pg_is_in_recovery() AND has_table_privilege('spool', 'INSERT')"
                )
        except DB_ERRORS:
            return
        if writable and failures == self._write_failures:
            self.healthy = True
            log.info("spool_writable_again", node=self.node)

    def _decode(self, message_id: str, encrypted: bool, payload: bytes) -> Message:
        raw = bytes(payload)
        if encrypted:
            if self.aead is None:
                raise ValueError("no key")
            raw = self.aead.decrypt(raw[:12], raw[12:], message_id.encode())
        return decode_message(raw)

    def _decode_rows(self, rows: list[asyncpg.Record]) -> list[Message]:
        out: list[Message] = []
        unreadable = 0
        for r in rows:
            try:
                out.append(self._decode(r["id"], r["encrypted"], r["payload"]))
            except Exception:  # wrong key or damaged row: keep it, report the count only
                unreadable += 1
        if unreadable:
            log.error("spool_rows_unreadable", count=unreadable)
        return out

    async def load(self) -> list[Message]:
        """Take this node's id (NodeInUse if a running router holds it) and
        return every message this node left in the spool (after a crash or a
        stop with messages still queued) that is not waiting for its send
        time, oldest first, with any row of a version that did not name its
        node. Rows of other nodes stay theirs; those of a dead node are
        adopted later by whichever live node sees it dead first."""
        await self._claim_node()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE spool SET node = $1 WHERE node IS NULL AND due_at IS NULL", self.node
            )
            rows = await conn.fetch(
                "SELECT id, encrypted, payload FROM spool WHERE node = $1 AND due_at IS NULL"
                " ORDER BY created_at",
                self.node,
            )
        out = self._decode_rows(rows)
        self.rows = int(await self.pool.fetchval("SELECT count(*) FROM spool"))
        metrics.SPOOL_ROWS.set(self.rows)
        return out

    # ---------------------------------------------------------------- nodes

    async def _claim_node(self) -> None:
        """Hold the node's advisory lock on a connection of its own for the
        life of this spool. A router killed a moment ago may still hold it
        until PostgreSQL sees its connection close: wait up to node_wait."""
        conn = await self.pool.acquire()
        holds_session_state(conn)
        try:
            deadline = time.monotonic() + self.node_wait
            while not await conn.fetchval(_NODE_LOCK, self.node):
                if time.monotonic() >= deadline:
                    raise NodeInUse(
                        f"node id {self.node!r} is held by another running router;"
                        " give each router sharing the database its own delivery.node"
                    )
                await asyncio.sleep(0.2)
            await conn.execute(
                "INSERT INTO router_nodes (node) VALUES ($1) ON CONFLICT (node)"
                " DO UPDATE SET started_at = now(), seen_at = now()",
                self.node,
            )
        except BaseException:
            await self.pool.release(conn)
            raise
        self._node_conn = conn

    async def _run_nodes(self) -> None:
        """Every node_grace/3 s: say this node is alive, and adopt the
        queued rows of nodes that are not (lock free, not seen for node_grace)."""
        while True:
            alive = False
            try:
                alive = await self._heartbeat()
                await self.adopt_orphans()
            except DB_ERRORS as exc:
                log.warning("spool_node_upkeep_failed", node=self.node, error=type(exc).__name__)
            # Until a heartbeat succeeds this node may hold no lock and its
            # peers count down node_grace: try again soon, not in node_grace/3.
            await asyncio.sleep(self.node_grace / 3 if alive else min(1.0, self.node_grace / 3))

    async def _heartbeat(self) -> bool:
        """Say this node is alive; take its lock again if it went with its
        connection. False if the lock is held elsewhere."""
        conn = self._node_conn
        if conn is None or _conn_lost(conn):
            # The lock went with its connection (a database restart or
            # outage): take it again. Until then other nodes still see this
            # one alive for node_grace seconds.
            if conn is not None:
                self._node_conn = None
                with contextlib.suppress(Exception):
                    await self.pool.release(conn)
            conn = await self.pool.acquire()
            holds_session_state(conn)
            try:
                locked = await conn.fetchval(_NODE_LOCK, self.node)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.pool.release(conn)
                raise
            if not locked:
                await self.pool.release(conn)
                log.error("spool_node_lock_lost", node=self.node)
                return False
            self._node_conn = conn
        await conn.execute(
            "INSERT INTO router_nodes (node) VALUES ($1) ON CONFLICT (node)"
            " DO UPDATE SET seen_at = now()",
            self.node,
        )
        return True

    async def adopt_orphans(self) -> int:
        """Take over the queued rows of every dead node; hand them to
        on_adopt. Returns how many were adopted."""
        dead = await self.pool.fetch(
            "SELECT node FROM router_nodes WHERE node <> $1"
            " AND seen_at < now() - make_interval(secs => $2)",
            self.node,
            self.node_grace,
        )
        total = 0
        for r in dead:
            async with self.pool.acquire() as conn, conn.transaction():
                # A node that is alive holds its lock: this fails and its rows stay.
                if not await conn.fetchval(_NODE_XACT_LOCK, r["node"]):
                    continue
                rows = await conn.fetch(
                    "UPDATE spool SET node = $1 WHERE node = $2 AND due_at IS NULL"
                    " RETURNING id, encrypted, payload, created_at",
                    self.node,
                    r["node"],
                )
                # Receipts other nodes left for it, and its binds (handoff.py).
                await conn.execute(
                    "UPDATE receipt_handoff SET node = $1, taken = false WHERE node = $2",
                    self.node,
                    r["node"],
                )
                await conn.execute(
                    "UPDATE carrier_receipt_handoff SET node = $1, taken = false WHERE node = $2",
                    self.node,
                    r["node"],
                )
                await conn.execute("DELETE FROM receipt_binds WHERE node = $1", r["node"])
                # (None: another node adopted it first, its rows moved already.)
                adopted_at = await conn.fetchval(
                    "DELETE FROM router_nodes WHERE node = $1 RETURNING now()", r["node"]
                )
            if adopted_at is not None:
                # The routes it wrote before now: not those of a life it
                # starts again under its name after this.
                if self.on_adopt_node is not None:
                    self.on_adopt_node(r["node"], adopted_at)
                else:
                    self.adopted_nodes.append((r["node"], adopted_at))
            if not rows:
                continue
            rows = sorted(rows, key=lambda row: row["created_at"])
            messages = self._decode_rows(rows)
            total += len(rows)
            metrics.SPOOL_ADOPTED.inc(len(rows))
            log.warning("spool_adopted", node=self.node, dead_node=r["node"], messages=len(rows))
            if self.on_adopt is not None and messages:
                self.on_adopt(messages)
        return total

    async def _leave(self) -> None:
        """After a clean stop: mark this node gone so others adopt what it
        left queued at once, and let go of its lock."""
        if self._nodes_task is not None:
            self._nodes_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._nodes_task
            self._nodes_task = None
        conn, self._node_conn = self._node_conn, None
        if conn is None:
            return
        try:
            if _conn_lost(conn):
                # The lock went with its connection; still say this node left.
                await self.pool.execute(
                    "UPDATE router_nodes SET seen_at = '-infinity' WHERE node = $1", self.node
                )
            else:
                await conn.execute(
                    "UPDATE router_nodes SET seen_at = '-infinity' WHERE node = $1", self.node
                )
                await conn.fetchval(_NODE_UNLOCK, self.node)
        except DB_ERRORS as exc:
            log.warning("spool_node_leave_failed", node=self.node, error=type(exc).__name__)
        finally:
            with contextlib.suppress(Exception):
                await self.pool.release(conn)

    # ------------------------------------------------------------ scheduled

    async def release_due(self, now: float, limit: int) -> list[Message]:
        """Scheduled messages whose time has come, earliest first, marked as
        released in the same statement (SKIP LOCKED: several routers may
        share the spool without taking the same row twice) and now this
        node's to send (adopted by another if it dies)."""
        rows = await self.pool.fetch(
            "UPDATE spool SET due_at = NULL, node = $3 WHERE id IN ("
            " SELECT id FROM spool WHERE due_at <= $1 ORDER BY due_at LIMIT $2"
            " FOR UPDATE SKIP LOCKED) RETURNING id, encrypted, payload",
            dt.datetime.fromtimestamp(now, _UTC),
            limit,
            self.node,
        )
        return sorted(self._decode_rows(rows), key=lambda m: m.send_at or 0.0)

    async def scheduled(self, message_id: str) -> Message | None:
        """A message still waiting for its send time, or None."""
        r = await self.pool.fetchrow(
            "SELECT id, encrypted, payload FROM spool WHERE id = $1 AND due_at IS NOT NULL",
            message_id,
        )
        return None if r is None else self._decode(r["id"], r["encrypted"], r["payload"])

    async def cancel(self, message_id: str, account_id: int) -> Message | None:
        """Delete a waiting scheduled message of this account; None if there
        is none (unknown, another account's, or already released)."""
        r = await self.pool.fetchrow(
            "DELETE FROM spool WHERE id = $1 AND account_id = $2 AND due_at IS NOT NULL"
            " RETURNING id, encrypted, payload",
            message_id,
            account_id,
        )
        if r is None:
            return None
        self.rows = max(self.rows - 1, 0)
        metrics.SPOOL_ROWS.set(self.rows)
        return self._decode(r["id"], r["encrypted"], r["payload"])

    async def scheduled_count(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM spool WHERE due_at IS NOT NULL"))
