"""A small asyncio ESME for tests, on our own protocol core.

(The interop tests use smpplib as the independent client; this one is for
tests that need many concurrent submits or precise control.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from router.smpp.constants import CommandId, Tag
from router.smpp.pdu import BindTransceiver, DeliverSm, Pdu, SubmitSm
from router.smpp.session import Role, SmppSession
from router.smpp.transport import SmppProtocol


class TestEsme(SmppProtocol):
    def __init__(self, window: int = 64) -> None:
        super().__init__(SmppSession(Role.ESME, window=window, peer_window=10_000))
        self.receipts: dict[str, DeliverSm] = {}
        self.delivers: list[DeliverSm] = []
        self.answer_delivers = True  # False: a customer that takes its receipts and never answers

    def on_request(self, pdu: Pdu) -> None:
        if pdu.command_id == CommandId.DELIVER_SM:
            assert isinstance(pdu, DeliverSm)
            self.delivers.append(pdu)
            rid = pdu.tlv_str(Tag.RECEIPTED_MESSAGE_ID)
            if rid:
                self.receipts[rid] = pdu
            if self.answer_delivers:
                self.answer(pdu)
            return
        super().on_request(pdu)

    async def submit(self, dest: str, text: str | bytes, **fields: Any) -> Pdu:
        """submit_sm from Acme (alphanumeric), receipt requested unless
        ``fields`` say otherwise; ``text`` as str (GSM-safe ASCII) or the
        short_message octets themselves."""
        fields.setdefault("source_addr_ton", 5)
        fields.setdefault("source_addr", "Acme")
        fields.setdefault("dest_addr_ton", 1)
        fields.setdefault("dest_addr_npi", 1)
        fields.setdefault("registered_delivery", 1)
        return await self.request(
            SubmitSm(
                destination_addr=dest,
                short_message=text if isinstance(text, bytes) else text.encode(),
                **fields,
            )
        )


async def connect(
    port: int,
    system_id: str = "acme",
    password: str = "acme-pw1",
    window: int = 64,
    bind_cls: type = BindTransceiver,
) -> tuple[TestEsme, Pdu]:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: TestEsme(window), "127.0.0.1", port)
    resp = await proto.request(bind_cls(system_id=system_id, password=password))
    return proto, resp


async def until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` every 20 ms until it is true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not met within {timeout} s")
