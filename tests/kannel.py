"""Kannel (bearerbox + smsbox) as a real SMPP peer for interop tests.

Kannel is the most deployed open-source SMS gateway; customers bind it to
SMS routers as an SMPP transceiver. This module writes a kannel.conf for a
test, starts ``bearerbox`` and ``smsbox`` in the foreground on loopback
ports, reads bearerbox's admin status and stops both by PID.

Tested with the Debian package ``kannel`` 1.4.5 (``apt-get install kannel``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.routerproc import free_port

SMSC_ID = "ourrouter"


def find_binary(name: str) -> str | None:
    """``name`` on PATH, else in /usr/sbin (Debian puts the boxes there)."""
    found = shutil.which(name)
    if found:
        return found
    path = Path("/usr/sbin") / name
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


@dataclass
class KannelConfig:
    """Everything kannel.conf needs; ports are free loopback ports."""

    workdir: Path
    router_port: int
    system_id: str
    password: str
    admin_port: int = field(default_factory=free_port)
    smsbox_port: int = field(default_factory=free_port)
    sendsms_port: int = field(default_factory=free_port)
    admin_password: str = "kannel-admin"
    user: str = "tester"
    user_password: str = "tester-pw"
    enquire_link_interval: int = 2
    max_pending_submits: int = 10
    max_messages: int = 5
    extra_smsc: str = ""  # more lines for the smsc group (e.g. msg-id-type)

    @property
    def path(self) -> Path:
        return self.workdir / "kannel.conf"

    @property
    def bearerbox_log(self) -> Path:
        return self.workdir / "bearerbox.log"

    @property
    def smsbox_log(self) -> Path:
        return self.workdir / "smsbox.log"

    @property
    def sendsms_url(self) -> str:
        return f"http://127.0.0.1:{self.sendsms_port}/cgi-bin/sendsms"

    def write(self) -> Path:
        w = self.workdir
        text = f"""
group = core
admin-port = {self.admin_port}
admin-interface = 127.0.0.1
admin-password = {self.admin_password}
status-password = {self.admin_password}
admin-deny-ip = "*.*.*.*"
admin-allow-ip = "127.0.0.1"
smsbox-port = {self.smsbox_port}
smsbox-interface = 127.0.0.1
box-deny-ip = "*.*.*.*"
box-allow-ip = "127.0.0.1"
log-file = "{w / "bearerbox.log"}"
log-level = 0
access-log = "{w / "bearerbox-access.log"}"
dlr-storage = internal

group = smsc
smsc = smpp
smsc-id = {SMSC_ID}
host = 127.0.0.1
port = {self.router_port}
transceiver-mode = true
smsc-username = "{self.system_id}"
smsc-password = "{self.password}"
system-type = ""
interface-version = 34
enquire-link-interval = {self.enquire_link_interval}
max-pending-submits = {self.max_pending_submits}
reconnect-delay = 1
{self.extra_smsc}

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {self.smsbox_port}
sendsms-port = {self.sendsms_port}
sendsms-interface = 127.0.0.1
log-file = "{w / "smsbox.log"}"
log-level = 0
access-log = "{w / "smsbox-access.log"}"

group = sendsms-user
username = {self.user}
password = {self.user_password}
user-deny-ip = "*.*.*.*"
user-allow-ip = "127.0.0.1"
max-messages = {self.max_messages}
concatenation = true

group = sms-service
keyword = default
text = "No service specified"
"""
        self.path.write_text(text.lstrip())
        return self.path


def _start(binary: str, cfg: KannelConfig, name: str) -> subprocess.Popen[bytes]:
    out = (cfg.workdir / f"{name}.stderr").open("ab")
    try:
        # -v 2: warnings and worse on stderr; the log file gets everything
        # (log-level 0: debug, PDU dumps included).
        return subprocess.Popen(
            [binary, "-v", "2", str(cfg.path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cfg.workdir,
        )
    finally:
        out.close()


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 5) -> None:
    """SIGTERM by PID, SIGKILL if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@dataclass
class SmscStatus:
    """One smsc of bearerbox's /status.xml."""

    id: str
    status: str  # "online 12s", "connecting", "re-connecting", "dead", ...
    sms_sent: int
    sms_received: int
    sms_failed: int
    sms_queued: int
    dlr_received: int

    @property
    def online(self) -> bool:
        return self.status.startswith("online")

    @property
    def online_seconds(self) -> int | None:
        m = re.match(r"online (\d+)s", self.status)
        return int(m.group(1)) if m else None


def _int(el: ET.Element | None, path: str) -> int:
    if el is None:
        return -1
    found = el.find(path)
    try:
        return int((found.text or "").strip()) if found is not None else -1
    except ValueError:
        return -1


def parse_status(xml: str) -> dict[str, SmscStatus]:
    """The smsc entries of /status.xml (1.4.5: <smsc><id/><status/><failed/>
    <queued/><sms><received/><sent/></sms><dlr>...</dlr></smsc>), by smsc-id."""
    root = ET.fromstring(xml)
    out: dict[str, SmscStatus] = {}
    for smsc in root.iter("smsc"):
        sid = (smsc.findtext("id") or smsc.findtext("name") or "").strip()
        out[sid] = SmscStatus(
            id=sid,
            status=(smsc.findtext("status") or "").strip(),
            sms_sent=_int(smsc, "sms/sent"),
            sms_received=_int(smsc, "sms/received"),
            sms_failed=_int(smsc, "failed"),
            sms_queued=_int(smsc, "queued"),
            dlr_received=_int(smsc, "dlr/received"),
        )
    return out


@dataclass
class LoggedPdu:
    """One SMPP PDU as bearerbox dumped it at log-level 0 (debug)."""

    direction: str  # "out": Kannel sent it to the router; "in": Kannel got it
    type_name: str
    fields: dict[str, int | str | bytes | None]

    def num(self, name: str) -> int:
        value = self.fields[name]
        assert isinstance(value, int), (name, value)
        return value

    def octets(self, name: str) -> bytes:
        """An octet-string field (dumped as hex), or a quoted C string."""
        value = self.fields.get(name)
        if isinstance(value, str):
            return value.encode("latin-1")
        return value if isinstance(value, bytes) else b""

    def text(self, name: str) -> str:
        return self.octets(name).decode("latin-1")


_LOG_LINE = re.compile(r"^\S+ \S+ \[\d+\] \[(\d+)\] DEBUG: (.*)$")
# "Sending PDU:", "Sending enquire link:", "Sending unbind:", "Got PDU:"
_ANNOUNCE = re.compile(r"^SMPP\[[^\]]*\]: (Sending|Got) [a-zA-Z_ ]+:$")
_NUMBER = re.compile(r"^(-?\d+) = 0x[0-9a-fA-F]+$")


def logged_pdus(log_text: str) -> list[LoggedPdu]:
    """Every PDU in a bearerbox log, in order. Lines are attributed by
    Kannel's thread number, so other threads' lines in between do no harm."""
    out: list[LoggedPdu] = []
    announced: dict[str, str] = {}
    current: dict[str, LoggedPdu] = {}
    octet_field: dict[str, str | None] = {}
    for line in log_text.splitlines():
        m = _LOG_LINE.match(line)
        if m is None:
            continue
        tid, msg = m.groups()
        a = _ANNOUNCE.match(msg)
        if a is not None:
            announced[tid] = "out" if a.group(1) == "Sending" else "in"
            continue
        if msg.startswith("SMPP PDU ") and msg.endswith(" dump:"):
            current[tid] = LoggedPdu(announced.pop(tid, "?"), "", {})
            octet_field[tid] = None
            continue
        pdu = current.get(tid)
        if pdu is None:
            continue
        if msg == "SMPP PDU dump ends.":
            out.append(pdu)
            del current[tid]
            continue
        if msg.startswith("  ") and not msg.startswith("   "):  # a field
            name, _, value = msg.strip().partition(":")
            value = value.strip()
            if name == "type_name":
                pdu.type_name = value
            elif value == "":
                pdu.fields[name] = b""  # an octet string; its data lines follow
                octet_field[tid] = name
            elif value == "NULL":
                pdu.fields[name] = None
            elif value.startswith('"') and value.endswith('"'):
                pdu.fields[name] = value[1:-1]
            elif (n := _NUMBER.match(value)) is not None:
                pdu.fields[name] = int(n.group(1))
            else:
                pdu.fields[name] = value
            continue
        stripped = msg.strip()
        field_name = octet_field.get(tid)
        if stripped.startswith("data: ") and field_name is not None:
            hex_part = stripped[len("data: ") :][:48]  # 16 "xx " groups, then ASCII
            prev = pdu.fields.get(field_name)
            assert isinstance(prev, bytes)
            pdu.fields[field_name] = prev + bytes.fromhex(hex_part)
    return out


def log_problems(log_text: str) -> list[str]:
    """bearerbox's WARNING/ERROR/PANIC lines."""
    return [
        line
        for line in log_text.splitlines()
        if re.match(r"^\S+ \S+ \[\d+\] \[\d+\] (WARNING|ERROR|PANIC):", line)
    ]


class Kannel:
    """bearerbox + smsbox for one test; ``stop()`` always ends both."""

    def __init__(self, cfg: KannelConfig, bearerbox: str, smsbox: str) -> None:
        self.cfg = cfg
        self.bearerbox_bin = bearerbox
        self.smsbox_bin = smsbox
        self.bearerbox: subprocess.Popen[bytes] | None = None
        self.smsbox: subprocess.Popen[bytes] | None = None

    async def status(self, http: aiohttp.ClientSession) -> dict[str, SmscStatus]:
        url = f"http://127.0.0.1:{self.cfg.admin_port}/status.xml"
        async with http.get(url, params={"password": self.cfg.admin_password}) as r:
            r.raise_for_status()
            return parse_status(await r.text())

    async def start(self, timeout: float = 20) -> None:
        """Start both boxes; return once the SMPP link is online and smsbox
        answers its sendsms port."""
        self.cfg.write()
        self.bearerbox = _start(self.bearerbox_bin, self.cfg, "bearerbox")
        deadline = time.monotonic() + timeout
        last = "no answer"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                self._check_alive(self.bearerbox, "bearerbox")
                try:
                    st = (await self.status(http)).get(SMSC_ID)
                    last = st.status if st else "smsc missing from status"
                    if st is not None and st.online:
                        break
                except (TimeoutError, aiohttp.ClientError, ET.ParseError) as exc:
                    last = repr(exc)
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"Kannel's SMPP link never came online ({last})\n" + self.log_tail()
                    )
                await asyncio.sleep(0.1)
            self.smsbox = _start(self.smsbox_bin, self.cfg, "smsbox")
            while True:
                self._check_alive(self.smsbox, "smsbox")
                try:
                    # Without credentials smsbox answers 403 (or 4xx): it is up.
                    async with http.get(self.cfg.sendsms_url) as r:
                        await r.read()
                        break
                except (TimeoutError, aiohttp.ClientError):
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("smsbox's sendsms port never answered\n" + self.log_tail())
                await asyncio.sleep(0.1)

    def _check_alive(self, proc: subprocess.Popen[bytes] | None, name: str) -> None:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}\n" + self.log_tail())

    def log_tail(self, chars: int = 6000) -> str:
        out = []
        for p in sorted(self.cfg.workdir.glob("*.log")) + sorted(self.cfg.workdir.glob("*.stderr")):
            text = p.read_text(errors="replace")
            out.append(f"--- {p.name} (last {chars} chars) ---\n{text[-chars:]}")
        return "\n".join(out)

    def stop(self) -> None:
        # smsbox first (it is bearerbox's client), then bearerbox.
        try:
            stop(self.smsbox)
        finally:
            stop(self.bearerbox)
