"""``@value`` classes (router/value.py): immutable where it is checked, plain at run time.

The per-message values are ordinary slotted dataclasses at run time (a frozen
one costs ~2 us more to build); their immutability is a type-checking
promise. These tests hold both halves: mypy refuses an assignment to a field
of each of them, and at run time they compare and hash as frozen ones do.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

from router.carriers.receipt import CarrierReceipt
from router.ingress.http import _Extra
from router.smpp.constants import MessageState
from router.text.segment import Encoded
from tests.factories import make_message

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_refuses_assigning_a_field_of_each_value_class(tmp_path: Path) -> None:
    snippet = tmp_path / "assign.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from router.carriers.receipt import CarrierReceipt
            from router.ingress.http import _Extra
            from router.model import Message
            from router.text.segment import Encoded


            def change(m: Message, r: CarrierReceipt, e: Encoded, x: _Extra) -> None:
                m.destination = "4587654321"
                r.error = "001"
                e.units = 3
                x.parts = 2
            """
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(snippet),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    for name, cls in (
        ("destination", "Message"),
        ("error", "CarrierReceipt"),
        ("units", "Encoded"),
        ("parts", "_Extra"),
    ):
        assert f'Property "{name}" defined in "{cls}" is read-only' in out, out
    assert "Found 4 errors" in out, out


def test_values_compare_hash_and_replace_like_frozen_dataclasses() -> None:
    a = make_message("0190aa00000000000001", accepted_at=1.0)
    b = make_message("0190aa00000000000001", accepted_at=1.0)
    assert a == b and hash(a) == hash(b)
    other = dataclasses.replace(a, destination="4587654321")
    assert other != a and other.destination == "4587654321" and a.destination == "4512345678"
    assert len({a, b, other}) == 2
    r = CarrierReceipt("abc", MessageState.DELIVERED, "000")
    assert r == CarrierReceipt("abc", MessageState.DELIVERED, "000")
    assert hash(r) == hash(CarrierReceipt("abc", MessageState.DELIVERED, "000"))
    e = Encoded("gsm7", 0, b"hi", 2)
    assert hash(e) == hash(Encoded("gsm7", 0, b"hi", 2))
    # Slotted: no per-instance dict, no stray attribute.
    for obj in (a, r, e, _Extra(1, None)):
        assert not hasattr(obj, "__dict__")
    # The personal fields stay out of repr (model.Message's own __repr__).
    assert "4512345678" not in repr(a) and "Acme" not in repr(a)
