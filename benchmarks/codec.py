"""SMPP codec micro-benchmark: router.smpp.pdu against aiosmpplib 0.7.4's PDU classes.

    python -m benchmarks.codec [--quick] [--output PATH]

Measures decodes/s and encodes/s of three PDUs that dominate router traffic, built from
the same octets for both codecs (checked before timing):

- submit_sm: 160-character GSM 03.38 text, one TLV (user_message_reference);
- deliver_sm: a delivery receipt (text plus receipted_message_id and message_state TLVs);
- submit_sm_resp: a 36-character message id.

Each figure is the best of 5 timed runs (``time.perf_counter``, garbage collector off, as
``timeit`` does). aiosmpplib always converts text to ``str`` while our codec keeps octets,
so two extra rows add GSM 03.38 text conversion (``router.text.gsm7``) to our side for a
like-for-like comparison. ``run(quick)`` returns the results; ``main`` prints the table and
writes ``benchmarks/results/codec.json``. No personal data: numbers and text are fictional
(Ofcom drama range 07700 900xxx).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from itertools import repeat
from pathlib import Path
from time import perf_counter
from typing import Any

from router.smpp.constants import MessageState, Tag
from router.smpp.pdu import DeliverSm, SubmitSm, SubmitSmResp, decode
from router.text.gsm7 import decode_gsm7, encode_gsm7

RUNS = 5
ITERATIONS = 20_000
QUICK_ITERATIONS = 2_000
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "codec.json"

SOURCE = "447700900123"
DESTINATION = "447700900456"
TEXT_160 = ("Your parcel 4711 arrives today between 10:00 and 12:00. Reply STOP to opt out. " * 2)[
    :160
]
MESSAGE_ID = "2f1c9a4e-7b7d-4e0b-9d35-6a1f1e0c8b21"
RECEIPT_TEXT = (
    f"id:{MESSAGE_ID} sub:001 dlvrd:001 submit date:2501011200 done date:2501011201 "
    "stat:DELIVRD err:000 Text:Your parcel 4711 a"
)
USER_MESSAGE_REFERENCE = 42

Op = Callable[[], object]


# ------------------------------------------------------------------- our codec


def _ours() -> dict[str, tuple[Op, bytes]]:
    """Operation name -> (callable, the octets it decodes or must produce)."""
    submit = SubmitSm(
        sequence=7,
        source_addr_ton=1,
        source_addr_npi=1,
        source_addr=SOURCE,
        dest_addr_ton=1,
        dest_addr_npi=1,
        destination_addr=DESTINATION,
        registered_delivery=1,
        short_message=encode_gsm7(TEXT_160),
        tlvs={Tag.USER_MESSAGE_REFERENCE: USER_MESSAGE_REFERENCE.to_bytes(2, "big")},
    )
    receipt = DeliverSm(
        sequence=8,
        source_addr_ton=1,
        source_addr_npi=1,
        source_addr=DESTINATION,
        dest_addr_ton=1,
        dest_addr_npi=1,
        destination_addr=SOURCE,
        esm_class=0x04,
        registered_delivery=1,
        short_message=encode_gsm7(RECEIPT_TEXT),
        tlvs={
            Tag.RECEIPTED_MESSAGE_ID: MESSAGE_ID.encode("ascii") + b"\x00",
            Tag.MESSAGE_STATE: bytes([MessageState.DELIVERED]),
        },
    )
    resp = SubmitSmResp(sequence=7, message_id=MESSAGE_ID)
    submit_wire, receipt_wire, resp_wire = submit.encode(), receipt.encode(), resp.encode()

    def submit_decode_text() -> str:
        return decode_gsm7(decode(submit_wire).short_message)  # type: ignore[attr-defined]

    def submit_encode_text() -> bytes:
        submit.short_message = encode_gsm7(TEXT_160)
        return submit.encode()

    return {
        "submit_sm decode": (lambda: decode(submit_wire), submit_wire),
        "submit_sm encode": (submit.encode, submit_wire),
        "deliver_sm receipt decode": (lambda: decode(receipt_wire), receipt_wire),
        "deliver_sm receipt encode": (receipt.encode, receipt_wire),
        "submit_sm_resp decode": (lambda: decode(resp_wire), resp_wire),
        "submit_sm_resp encode": (resp.encode, resp_wire),
        "submit_sm decode + GSM text": (submit_decode_text, submit_wire),
        "submit_sm encode + GSM text": (submit_encode_text, submit_wire),
    }


# ------------------------------------------------------------------- aiosmpplib


def _aiosmpplib(wires: dict[str, bytes]) -> dict[str, Op]:
    """The same operations on aiosmpplib's dataclasses; raises ImportError without it."""
    from aiosmpplib import NPI, TON, OptionalParam, PhoneNumber, SmppMessage
    from aiosmpplib import DeliverSm as ADeliverSm
    from aiosmpplib import SubmitSm as ASubmitSm
    from aiosmpplib import SubmitSmResp as ASubmitSmResp

    src = PhoneNumber(SOURCE, TON.INTERNATIONAL, NPI.ISDN)
    dst = PhoneNumber(DESTINATION, TON.INTERNATIONAL, NPI.ISDN)
    submit = ASubmitSm(
        sequence_num=7,
        short_message=TEXT_160,
        source=src,
        destination=dst,
        registered_delivery=1,
        optional_params=[OptionalParam(Tag.USER_MESSAGE_REFERENCE, USER_MESSAGE_REFERENCE)],
    )
    receipt = ADeliverSm(
        sequence_num=8,
        short_message=RECEIPT_TEXT,
        source=dst,
        destination=src,
        esm_class=0x04,
        registered_delivery=1,
        optional_params=[
            OptionalParam(Tag.RECEIPTED_MESSAGE_ID, MESSAGE_ID),
            OptionalParam(Tag.MESSAGE_STATE, int(MessageState.DELIVERED)),
        ],
    )
    resp = ASubmitSmResp(sequence_num=7, message_id=MESSAGE_ID)
    parse_header = SmppMessage.parse_header
    submit_wire = wires["submit_sm decode"]
    receipt_wire = wires["deliver_sm receipt decode"]
    resp_wire = wires["submit_sm_resp decode"]

    def encoder(msg: Any) -> Op:
        # SubmitSm.pdu() caches the encoded text on the object; clear it (public API) so
        # every call pays for the whole encode, as for a freshly built message.
        def run() -> bytes:
            msg.set_encoded_message(b"")
            return msg.pdu()  # type: ignore[no-any-return]

        return run

    def decoder(cls: Any, wire: bytes) -> Op:
        return lambda: cls.from_pdu(wire, parse_header(wire[:16]), "gsm0338")

    submit_decode = decoder(ASubmitSm, submit_wire)
    submit_encode = encoder(submit)
    return {
        "submit_sm decode": submit_decode,
        "submit_sm encode": submit_encode,
        "deliver_sm receipt decode": decoder(ADeliverSm, receipt_wire),
        "deliver_sm receipt encode": encoder(receipt),
        "submit_sm_resp decode": decoder(ASubmitSmResp, resp_wire),
        "submit_sm_resp encode": resp.pdu,
        # aiosmpplib converts text in every call anyway: the same operations again.
        "submit_sm decode + GSM text": submit_decode,
        "submit_sm encode + GSM text": submit_encode,
    }


def _check_same_payloads(ours: dict[str, tuple[Op, bytes]], theirs: dict[str, Op]) -> None:
    """Both codecs must produce and read the very same octets, or the comparison is void."""
    for name, (op, wire) in ours.items():
        if "encode" in name:
            assert op() == wire, f"{name}: our encoder does not reproduce the payload"
            assert theirs[name]() == wire, f"{name}: aiosmpplib encodes different octets"
        else:
            assert decode(wire).encode() == wire, name
            theirs[name]()  # must not raise


# ------------------------------------------------------------------- timing


def _best_rate(op: Op, iterations: int, runs: int = RUNS) -> float:
    """Operations per second: the best of ``runs`` timed loops of ``iterations`` calls."""
    op()  # warm caches and lazy imports outside the timed loops
    best = 0.0
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(runs):
            start = perf_counter()
            for _ in repeat(None, iterations):
                op()
            elapsed = perf_counter() - start
            best = max(best, iterations / elapsed)
    finally:
        if gc_was_enabled:
            gc.enable()
    return best


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    from router import accel  # our codec ran compiled or not: say which

    return {
        "router_build": accel.status()["kind"],
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark and return its results (no printing, no files)."""
    iterations = QUICK_ITERATIONS if quick else ITERATIONS
    ours = _ours()
    try:
        theirs: dict[str, Op] | None = _aiosmpplib({k: w for k, (_, w) in ours.items()})
    except ImportError:
        theirs = None
    if theirs is not None:
        _check_same_payloads(ours, theirs)

    rows = []
    for name, (op, wire) in ours.items():
        ours_rate = _best_rate(op, iterations)
        their_rate = _best_rate(theirs[name], iterations) if theirs is not None else None
        rows.append(
            {
                "operation": name,
                "octets": len(wire),
                "ours_per_s": round(ours_rate),
                "aiosmpplib_per_s": round(their_rate) if their_rate else None,
                "ratio": round(ours_rate / their_rate, 2) if their_rate else None,
            }
        )
    return {
        "benchmark": "codec",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "iterations_per_run": iterations,
        "runs": RUNS,
        "statistic": "best of runs, operations per second",
        "machine": machine_info(),
        "packages": {
            "sms-router": _version("sms-router"),
            "aiosmpplib": _version("aiosmpplib"),
        },
        "results": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    header = f"{'operation':<30} {'octets':>6} {'ours/s':>12} {'aiosmpplib/s':>13} {'ratio':>7}"
    lines = [header, "-" * len(header)]
    for r in result["results"]:
        theirs = f"{r['aiosmpplib_per_s']:,}" if r["aiosmpplib_per_s"] else "n/a"
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "n/a"
        lines.append(
            f"{r['operation']:<30} {r['octets']:>6} {r['ours_per_s']:>12,} {theirs:>13} {ratio:>7}"
        )
    m = result["machine"]
    lines.append(
        f"best of {result['runs']} x {result['iterations_per_run']:,} calls; "
        f"{m['cores']} cores, Python {m['python']}, "
        f"aiosmpplib {result['packages']['aiosmpplib'] or 'not installed'}"
    )
    return "\n".join(lines)


def write_results(result: dict[str, Any], path: Path = DEFAULT_OUTPUT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (CI smoke run)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result file")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    print(format_table(result))
    print(f"wrote {write_results(result, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
