"""An independent SMPP client for interop tests: smpplib, whose blocking read
loop runs in a thread. Shared by the end-to-end and front-door tests."""

from __future__ import annotations

import threading
from typing import Any

import smpplib.client
import smpplib.consts
import smpplib.gsm


class Smpplib:
    """An smpplib client; its blocking read loop runs in a thread."""

    def __init__(self, port: int, system_id: str = "acme", password: str = "acme-pw1") -> None:
        self.client = smpplib.client.Client(
            "127.0.0.1", port, timeout=10, allow_unknown_opt_params=True
        )
        self.sent: list[Any] = []
        self.delivers: list[Any] = []
        self.client.set_message_sent_handler(lambda pdu: self.sent.append(pdu))
        self.client.set_message_received_handler(lambda pdu: self.delivers.append(pdu))
        self.system_id = system_id
        self.password = password
        self.thread: threading.Thread | None = None

    def bind(self, kind: str) -> None:
        self.client.connect()
        getattr(self.client, f"bind_{kind}")(system_id=self.system_id, password=self.password)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            self.client.listen()
        except Exception:
            pass

    def submit(self, dest: str, text: str, **kw: Any) -> int:
        parts, coding, esm = smpplib.gsm.make_parts(text)
        for part in parts:
            self.client.send_message(
                source_addr_ton=smpplib.consts.SMPP_TON_ALNUM,
                source_addr="Acme",
                dest_addr_ton=smpplib.consts.SMPP_TON_INTL,
                dest_addr_npi=smpplib.consts.SMPP_NPI_ISDN,
                destination_addr=dest,
                short_message=part,
                data_coding=coding,
                esm_class=esm,
                registered_delivery=True,
                **kw,
            )
        return len(parts)

    def receipted_ids(self) -> list[str]:
        out = []
        for d in self.delivers:
            rid = d.receipted_message_id
            out.append(rid.decode() if isinstance(rid, bytes) else str(rid))
        return out

    def close(self) -> None:
        try:
            self.client.unbind()
        except Exception:
            pass
        try:
            self.client.disconnect()
        except Exception:
            pass
        if self.thread is not None:
            self.thread.join(timeout=5)
