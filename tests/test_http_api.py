"""The HTTP front door over real HTTP: a router from ``stack_factory`` (real
PostgreSQL, simulated carriers over SMPP), an aiohttp client, every field,
error path and status code of POST /v1/messages and GET /v1/messages/{id}.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from router.accounts import add_api_key
from router.config import HttpConfig
from router.ingress.http import (
    BadRequest,
    IdempotencyStore,
    _dumps_answer,
    _Outcomes,
    _parse_json,
)
from router.ingress.openapi import PROBLEM_BASE
from router.model import Status

DEMO = {"Authorization": "Bearer demo-key"}
ACME = {"Authorization": "Bearer acme-key-0001"}
DK = "+4512345678"
US = "+14155552671"


async def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    json_body: Any = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    hdrs = dict(DEMO) if headers is None else dict(headers)
    if json_body is not None:
        data = json.dumps(json_body)
        hdrs.setdefault("Content-Type", "application/json")
    async with http.request(method, url, data=data, headers=hdrs) as resp:
        raw = await resp.read()
        body = json.loads(raw) if raw else None
        return resp.status, body, resp


def assert_problem(
    status: int,
    body: Any,
    resp: aiohttp.ClientResponse,
    code: int,
    slug: str,
    field: str | None = None,
) -> None:
    assert status == code, body
    assert resp.content_type == "application/problem+json"
    assert body["type"] == PROBLEM_BASE + slug, body
    assert body["status"] == code and body["title"]
    if field is not None:
        assert body.get("field") == field, body
    assert "Traceback" not in json.dumps(body)


def msg(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"to": DK, "from": "Acme", "text": "Hello"}
    base.update(kw)
    return base


# ------------------------------------------------------------ happy paths


async def test_single_message_is_accepted_routed_and_reported(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    url = stack.http_url + "/v1/messages"
    status, body, _ = await call(
        http,
        "POST",
        url,
        json_body=msg(
            userref="order-17", labels={"campaign": "spring", "team": "ops"}, validity_seconds=600
        ),
    )
    assert status == 202, body
    assert set(body) == {"id", "status", "parts", "encoding"}
    assert body["status"] == "accepted" and body["parts"] == 1 and body["encoding"] == "gsm7"
    mid = body["id"]
    await wait_for(lambda: stack.sims["sim-eu"].received_count() == 1)
    rec = stack.sims["sim-eu"].received[0]
    assert rec.destination == "4512345678" and rec.source == "Acme"

    async def final() -> dict[str, Any]:
        for _ in range(200):
            s, b, _ = await call(http, "GET", f"{stack.http_url}/v1/messages/{mid}")
            assert s == 200, b
            if b["status"] == "delivered":
                return b  # type: ignore[no-any-return]
            await asyncio.sleep(0.02)
        raise AssertionError("not delivered")

    b = await final()
    assert b["id"] == mid and b["carrier"] == "sim-eu" and b["error"] is None
    assert b["class"] == "standard" and b["country"] == "DK" and b["userref"] == "order-17"
    assert b["labels"] == {"campaign": "spring", "team": "ops"}
    assert b["parts"] == 1 and b["encoding"] == "gsm7"
    for k in ("accepted_at", "updated_at", "expires_at"):
        assert b[k].endswith("Z")
    assert "4512345678" not in json.dumps(b)  # never echoes a number


async def test_encoding_and_parts_are_reported(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    url = stack.http_url + "/v1/messages"
    s, b, _ = await call(http, "POST", url, json_body=msg(text="x" * 161))
    assert (s, b["parts"], b["encoding"]) == (202, 2, "gsm7")
    s, b, _ = await call(http, "POST", url, json_body=msg(text="Привет мир"))
    assert (s, b["parts"], b["encoding"]) == (202, 1, "ucs2")
    s, b, _ = await call(http, "POST", url, json_body=msg(text="ж" * 71, to=US))
    assert (s, b["parts"], b["encoding"]) == (202, 2, "ucs2")
    s, b, _ = await call(http, "POST", url, json_body=msg(text="€[]{}", max_parts=1))
    assert (s, b["parts"], b["encoding"]) == (202, 1, "gsm7")
    # Segments: 2 + 1 + 1 to DK, 2 to the US.
    await wait_for(
        lambda: (
            stack.sims["sim-eu"].received_count() == 4
            and stack.sims["sim-world"].received_count() == 2
        )
    )
    assert {m.esm_class & 0x40 for m in stack.sims["sim-eu"].received} == {0, 0x40}


async def test_to_list_fans_out_with_batch_answer(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    s, b, _ = await call(
        http, "POST", stack.http_url + "/v1/messages", json_body=msg(to=[DK, US, "4512345679"])
    )
    assert s == 202, b
    assert b["accepted"] == 3 and b["rejected"] == 0 and b["errors"] == []
    assert [(m["index"], m["recipient"]) for m in b["messages"]] == [(0, 0), (0, 1), (0, 2)]
    assert len({m["id"] for m in b["messages"]}) == 3
    await wait_for(
        lambda: (
            stack.sims["sim-eu"].received_count() == 2
            and stack.sims["sim-world"].received_count() == 1
        )
    )


async def test_batch_partial_acceptance_reports_each_refusal(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    batch = {
        "messages": [
            msg(),  # 0 ok
            msg(**{"from": "WayTooLongSender"}),  # 1 bad sender
            msg(to=[DK, "12"]),  # 2 one bad number: item refused
            msg(send_at="2030-01-01"),  # 3 send_at without time and offset
            msg(text="x" * 400, max_parts=2),  # 4 too many parts
            "not an object",  # 5
            msg(colour="red"),  # 6 unknown field
            msg(to=[US, DK], class_="x"),  # 7 unknown field class_
            msg(to=[US, DK], **{"class": "secret"}),  # 8 ok, 2 recipients
        ]
    }
    s, b, _ = await call(http, "POST", stack.http_url + "/v1/messages", json_body=batch)
    assert s == 202, b
    assert b["accepted"] == 3
    assert b["rejected"] == 1 + 2 + 1 + 1 + 1 + 1 + 2
    assert [(m["index"], m["recipient"]) for m in b["messages"]] == [(0, 0), (8, 0), (8, 1)]
    errors = {e["index"]: e for e in b["errors"]}
    assert set(errors) == {1, 2, 3, 4, 5, 6, 7}
    expect = {
        1: ("invalid-sender", "from"),
        2: ("invalid-destination", "to"),
        3: ("invalid-send-at", "send_at"),
        4: ("too-many-parts", "text"),
        5: ("invalid-field", None),
        6: ("invalid-field", "colour"),
        7: ("invalid-field", "class_"),
    }
    for i, (slug, field) in expect.items():
        assert errors[i]["type"] == PROBLEM_BASE + slug, errors[i]
        assert errors[i].get("field") == field
        assert "recipient" not in errors[i]
    await wait_for(
        lambda: (
            stack.sims["sim-eu"].received_count() == 2
            and stack.sims["sim-world"].received_count() == 1
        )
    )
    assert "WayTooLong" not in json.dumps(b) and "4512345678" not in json.dumps(b)


async def test_ten_thousand_recipients_in_one_request(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    to = [f"+4512{i:06d}" for i in range(5000)] + [f"+1415{i:07d}" for i in range(5000)]
    started = time.monotonic()
    s, b, _ = await call(http, "POST", stack.http_url + "/v1/messages", json_body=msg(to=to))
    assert s == 202 and b["accepted"] == 10_000 and b["rejected"] == 0
    assert time.monotonic() - started < 10
    assert len({m["id"] for m in b["messages"]}) == 10_000
    s, b, r = await call(http, "POST", stack.http_url + "/v1/messages", json_body=msg(to=to + [DK]))
    assert_problem(s, b, r, 413, "batch-too-large")


async def test_batch_with_nothing_accepted_is_422_with_errors(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    s, b, r = await call(
        http,
        "POST",
        stack.http_url + "/v1/messages",
        json_body={"messages": [msg(text=""), msg(to="+0123")]},
    )
    assert_problem(s, b, r, 422, "batch-rejected")
    assert [(e["index"], e["type"]) for e in b["errors"]] == [
        (0, PROBLEM_BASE + "invalid-text"),
        (1, PROBLEM_BASE + "invalid-destination"),
    ]
    s, b, r = await call(http, "POST", stack.http_url + "/v1/messages", json_body={"messages": []})
    assert_problem(s, b, r, 422, "invalid-field", "messages")
    s, b, r = await call(
        http, "POST", stack.http_url + "/v1/messages", json_body={"messages": [msg()], "extra": 1}
    )
    assert_problem(s, b, r, 422, "invalid-field", "extra")


# --------------------------------------------------------------- field errors


BAD_FIELDS: list[tuple[dict[str, Any], str, str | None]] = [
    ({"to": None}, "invalid-destination", "to"),
    ({"to": "4512"}, "invalid-destination", "to"),
    ({"to": "0045 12345678"}, "invalid-destination", "to"),
    ({"to": []}, "invalid-destination", "to"),
    ({"to": [DK, 4512345678]}, "invalid-destination", "to"),
    ({"from": "ABCDEFGHIJKL"}, "invalid-sender", "from"),
    ({"from": "1234567890123456"}, "invalid-sender", "from"),
    ({"from": "Åbc"}, "invalid-sender", "from"),
    ({"from": ""}, "invalid-sender", "from"),
    ({"from": 12}, "invalid-sender", "from"),
    ({"text": ""}, "invalid-text", "text"),
    ({"text": 5}, "invalid-text", "text"),
    ({"text": "a\u0000b"}, "invalid-text", "text"),
    ({"text": "a\ud800b"}, "invalid-text", "text"),
    ({"class": "vip"}, "invalid-field", "class"),
    ({"class": None}, "invalid-field", "class"),
    ({"class": ["secret"]}, "invalid-field", "class"),
    ({"class": {"secret": 1}}, "invalid-field", "class"),
    ({"class": 1}, "invalid-field", "class"),
    ({"class": "Secret"}, "invalid-field", "class"),
    ({"validity_seconds": 0}, "invalid-field", "validity_seconds"),
    ({"validity_seconds": 7 * 24 * 3600 + 1}, "invalid-field", "validity_seconds"),
    ({"validity_seconds": 60.5}, "invalid-field", "validity_seconds"),
    ({"validity_seconds": True}, "invalid-field", "validity_seconds"),
    ({"userref": "u" * 65}, "invalid-field", "userref"),
    ({"userref": 7}, "invalid-field", "userref"),
    ({"callback_url": "ftp://example.com/x"}, "invalid-field", "callback_url"),
    ({"callback_url": "https://"}, "invalid-field", "callback_url"),
    ({"callback_url": "https://example.invalid/a\u0000b"}, "invalid-field", "callback_url"),
    ({"callback_url": "https://example.invalid/a\ud800b"}, "invalid-field", "callback_url"),
    ({"callback_url": "https://example.invalid/" + "a" * 2048}, "invalid-field", "callback_url"),
    ({"max_parts": 0}, "invalid-field", "max_parts"),
    ({"max_parts": 256}, "invalid-field", "max_parts"),
    ({"text": "x" * 161, "max_parts": 1}, "too-many-parts", "text"),
    ({"text": "x" * 2000}, "too-many-parts", "text"),  # default max_parts 10
    ({"labels": {f"k{i}": "v" for i in range(11)}}, "invalid-field", "labels"),
    ({"labels": {"k": "v" * 65}}, "invalid-field", "labels"),
    ({"labels": {"k" * 33: "v"}}, "invalid-field", "labels"),
    ({"labels": {"": "v"}}, "invalid-field", "labels"),
    ({"labels": {"k": 1}}, "invalid-field", "labels"),
    ({"labels": ["a"]}, "invalid-field", "labels"),
    ({"send_at": "2030-01-01"}, "invalid-send-at", "send_at"),
    ({"send_at": "2030-01-01T00:00:00"}, "invalid-send-at", "send_at"),  # no offset
    ({"send_at": "tomorrow"}, "invalid-send-at", "send_at"),
    ({"send_at": None}, "invalid-send-at", "send_at"),
    ({"send_at": 1767225600}, "invalid-send-at", "send_at"),
    ({"priority": 1}, "invalid-field", "priority"),
]


async def test_every_field_error_is_422_naming_the_field(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    url = stack.http_url + "/v1/messages"
    for change, slug, field in BAD_FIELDS:
        body = msg(**change)
        s, b, r = await call(http, "POST", url, json_body=body)
        assert_problem(s, b, r, 422, slug, field)
        # The answer never echoes the value at fault.
        for v in change.values():
            if isinstance(v, str) and len(v) > 3:
                assert v not in b.get("detail", ""), (change, b)
    # Valid edge values are accepted.
    for change in (
        {"from": "+4512345678"},
        {"from": "123456789012345"},
        {"from": "A b-c.d_e&"},
        {"to": "4512345678"},
        {"validity_seconds": 1},
        {"max_parts": 255},
        {"class": "secret"},
        {"userref": "u" * 64},
        {"labels": {}},
        {"callback_url": "https://example.invalid/hook?x=1"},
    ):
        s, b, _ = await call(http, "POST", url, json_body=msg(**change))
        assert s == 202, (change, b)


async def test_no_route_is_422(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    from router.config import RouteEntry, RoutesConfig

    stack = await stack_factory(routes=RoutesConfig(countries={"DK": [RouteEntry("sim-eu")]}))
    s, b, r = await call(http, "POST", stack.http_url + "/v1/messages", json_body=msg(to=US))
    assert_problem(s, b, r, 422, "no-route", "to")
    s, b, _ = await call(http, "POST", stack.http_url + "/v1/messages", json_body=msg(to=[DK, US]))
    assert s == 202 and b["accepted"] == 1
    assert b["errors"] == [
        {
            "index": 0,
            "recipient": 1,
            "type": PROBLEM_BASE + "no-route",
            "field": "to",
            "detail": b["errors"][0]["detail"],
        }
    ]


# ----------------------------------------------------------- JSON and media


async def test_strict_json_media_type_and_size_limits(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory(http=HttpConfig(max_body=2000, max_batch=3))
    url = stack.http_url + "/v1/messages"
    ct = {**DEMO, "Content-Type": "application/json"}
    cases = [
        ('{"to": "+4512345678", "from": "A", "text": NaN}', "invalid-json"),
        (
            '{"to": "+4512345678", "from": "A", "text": "x", "validity_seconds": Infinity}',
            "invalid-json",
        ),
        ('{"to": "+4512345678", "to": "+4512345679", "from": "A", "text": "x"}', "invalid-json"),
        ('{"to": "+4512345678", "from": "A", "text": "x"', "invalid-json"),
        ("", "invalid-json"),
    ]
    for raw, slug in cases:
        s, b, r = await call(http, "POST", url, data=raw.encode(), headers=ct)
        assert_problem(s, b, r, 400, slug)
    s, b, r = await call(http, "POST", url, data=b'{"text": "\xff"}', headers=ct)
    assert_problem(s, b, r, 400, "invalid-json")
    s, b, r = await call(http, "POST", url, data=b"[1, 2]", headers=ct)
    assert_problem(s, b, r, 422, "invalid-field")
    for ctype in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
    ):
        s, b, r = await call(
            http,
            "POST",
            url,
            data=json.dumps(msg()).encode(),
            headers={**DEMO, "Content-Type": ctype},
        )
        assert_problem(s, b, r, 415, "unsupported-media-type")
    s, b, _ = await call(
        http,
        "POST",
        url,
        data=json.dumps(msg()).encode(),
        headers={**DEMO, "Content-Type": "application/json; charset=UTF-8"},
    )
    assert s == 202, b
    # Body size: declared, and streamed without a Content-Length.
    big = json.dumps(msg(text="x" * 3000)).encode()
    s, b, r = await call(http, "POST", url, data=big, headers=ct)
    assert_problem(s, b, r, 413, "body-too-large")

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 500):
            yield big[i : i + 500]

    s, b, r = await call(http, "POST", url, data=chunks(), headers=ct)
    assert_problem(s, b, r, 413, "body-too-large")
    # Recipients per request.
    s, b, r = await call(http, "POST", url, json_body=msg(to=[DK] * 4))
    assert_problem(s, b, r, 413, "batch-too-large")
    s, b, r = await call(http, "POST", url, json_body={"messages": [msg(), msg(to=[DK] * 3)]})
    assert_problem(s, b, r, 413, "batch-too-large")
    s, b, _ = await call(http, "POST", url, json_body={"messages": [msg(), msg(to=[DK, US])]})
    assert s == 202 and b["accepted"] == 3


def _loads_per_call(raw: bytes) -> tuple[str, Any]:
    """What the front door answered when it called json.loads with the hooks
    per request: ("ok", document) or ("invalid-json", detail)."""

    def no_nan(value: str) -> Any:
        raise ValueError("NaN and Infinity are not JSON")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError("duplicate key in a JSON object")
            out[k] = v
        return out

    try:
        return "ok", json.loads(
            raw.decode("utf-8"), parse_constant=no_nan, object_pairs_hook=no_duplicates
        )
    except UnicodeDecodeError:
        return "invalid-json", "the body is not UTF-8"
    except json.JSONDecodeError as exc:
        return "invalid-json", f"syntax error at line {exc.lineno} column {exc.colno}"
    except ValueError as exc:
        return "invalid-json", str(exc)
    except RecursionError:
        return "invalid-json", "JSON nested too deeply"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"to": "+4512345678", "from": "A", "text": "x"}',
        b'{"messages": [{"to": ["+4512345678"], "labels": {"a": "b"}}], "n": 1.5e3}',
        b'\xef\xbb\xbf{"to": "+4512345678"}',  # UTF-8 BOM
        b'{"text": NaN}',
        b'{"n": -Infinity}',
        b'{"a": {"b": 1, "b": 2}}',
        b'{"a": 1,\n "b": }',
        b'{"text": "\xff"}',
        b'"\\ud800"',
        b"",
        b"  ",
        b"[1, 2] x",
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_body_parsing_matches_json_loads(raw: bytes) -> None:
    """The one shared strict decoder answers exactly as json.loads with the
    same hooks did: the same document, or the same invalid-json detail."""
    kind, expected = _loads_per_call(raw)
    if kind == "ok":
        assert _parse_json(raw) == expected
        return
    with pytest.raises(BadRequest) as caught:
        _parse_json(raw)
    response = caught.value.response
    assert response.status == 400
    assert response.text is not None
    body = json.loads(response.text)
    assert body["type"] == PROBLEM_BASE + kind and body["detail"] == expected


@pytest.mark.parametrize(
    "body",
    [
        {"id": "0190a1b2c3d4e5f6a7b8", "status": "accepted", "parts": 1, "encoding": "gsm7"},
        {"id": "0190a1b2c3d4e5f6a7b8", "status": "scheduled", "parts": 12, "encoding": "ucs2"},
        {"id": "0190a1b2c3d4e5f6a7b8", "status": "accepted", "parts": 1, "encoding": "other"},
        {  # scheduled: one more key
            "id": "0190a1b2c3d4e5f6a7b8",
            "status": "scheduled",
            "parts": 1,
            "encoding": "gsm7",
            "send_at": "2030-01-01T09:00:00.000Z",
        },
        # Keys in another order (a replay read back from jsonb), values needing escapes
        # or of other types: all must still come out exactly as json.dumps writes them.
        {"parts": 1, "id": "0190a1b2c3d4e5f6a7b8", "status": "accepted", "encoding": "gsm7"},
        {"id": 'a"b\\c', "status": "accepted", "parts": 1, "encoding": "gsm7"},
        {"id": "id-1", "status": "accepted", "parts": 1, "encoding": "gsm7"},
        {"id": "\u00e9t\u00e9", "status": "accepted", "parts": 1, "encoding": "gsm7"},
        {"id": "x", "status": "accepted", "parts": True, "encoding": "gsm7"},
        {"id": "x", "status": "accepted", "parts": "1", "encoding": "gsm7"},
        {"id": "x", "status": "accepted", "parts": 1.0, "encoding": None},
        {"id": 7, "status": "accepted", "parts": 1, "encoding": "gsm7"},
        {"accepted": 1, "rejected": 0, "messages": [], "errors": []},
    ],
)
def test_answer_text_is_json_dumps(body: dict[str, Any]) -> None:
    assert _dumps_answer(body) == json.dumps(body)


async def test_unknown_route_and_method_are_problems(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    s, b, r = await call(http, "GET", stack.http_url + "/v2/nothing")
    assert_problem(s, b, r, 404, "not-found")
    s, b, r = await call(http, "DELETE", stack.http_url + "/v1/messages")
    assert_problem(s, b, r, 405, "method-not-allowed")
    assert "POST" in r.headers["Allow"]
    # Nesting deep enough to exhaust the parser's recursion limit.
    s, b, r = await call(
        http,
        "POST",
        stack.http_url + "/v1/messages",
        data=b"[" * 100_000 + b"]" * 100_000,
        headers={**DEMO, "Content-Type": "application/json"},
    )
    assert_problem(s, b, r, 400, "invalid-json")


async def test_internal_error_is_a_bare_500(
    stack_factory: Any, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await stack_factory()

    def boom(msg: Any, done: Any) -> Any:
        raise RuntimeError("secret detail /srv/router/engine.py line 3")

    monkeypatch.setattr(stack.router.engine, "submit", boom)
    s, b, r = await call(http, "POST", stack.http_url + "/v1/messages", json_body=msg())
    assert_problem(s, b, r, 500, "internal-error")
    assert "secret detail" not in json.dumps(b) and "engine.py" not in json.dumps(b)


# -------------------------------------------------------------------- auth


async def test_authentication_and_permissions(
    stack_factory: Any, db: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    url = stack.http_url + "/v1/messages"
    acme = await db.fetchval("SELECT id FROM accounts WHERE name = 'acme'")
    await add_api_key(db, acme, "acme-readonly", ("read",))
    await add_api_key(db, acme, "acme-adminonly", ("admin",))
    await stack.router.reload()
    for headers in (
        {},
        {"Authorization": "Basic YWNtZTpwdw=="},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer " + "k" * 600},
    ):
        s, b, r = await call(http, "POST", url, json_body=msg(), headers=headers)
        assert_problem(s, b, r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    for key in ("acme-key-0002", "nosuchprefix-key"):
        s, b, r = await call(
            http, "POST", url, json_body=msg(), headers={"Authorization": f"Bearer {key}"}
        )
        assert_problem(s, b, r, 401, "unauthorized")
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    s, b, r = await call(
        http, "POST", url, json_body=msg(), headers={"Authorization": "Bearer acme-readonly"}
    )
    assert_problem(s, b, r, 403, "forbidden")
    # Auth comes before anything else: no body parsing for a stranger.
    s, b, r = await call(http, "POST", url, data=b"{bad", headers={"Content-Type": "text/plain"})
    assert_problem(s, b, r, 401, "unauthorized")

    s, b, _ = await call(http, "POST", url, json_body=msg(), headers=ACME)
    assert s == 202
    mid = b["id"]
    s, b, _ = await call(
        http, "GET", f"{url}/{mid}", headers={"Authorization": "Bearer acme-readonly"}
    )
    assert s == 200 and b["id"] == mid
    s, b, r = await call(
        http, "GET", f"{url}/{mid}", headers={"Authorization": "Bearer acme-adminonly"}
    )
    assert_problem(s, b, r, 403, "forbidden")
    s, b, r = await call(http, "GET", f"{url}/{mid}", headers={})
    assert_problem(s, b, r, 401, "unauthorized")
    # Another account's message looks exactly like one that does not exist.
    s1, b1, r1 = await call(http, "GET", f"{url}/{mid}", headers=DEMO)
    s2, b2, _ = await call(http, "GET", f"{url}/{'0' * 20}", headers=DEMO)
    s3, b3, _ = await call(http, "GET", f"{url}/not-an-id", headers=DEMO)
    assert_problem(s1, b1, r1, 404, "not-found")
    assert (s1, b1) == (s2, b2) == (s3, b3)


async def test_a_verified_key_stops_working_once_revoked_or_disabled(
    stack_factory: Any, db: Any, http: aiohttp.ClientSession
) -> None:
    """A key verified once is answered from memory (no argon2 run, no
    coroutine), also across reloads; revoking it or disabling its account
    still refuses the very next request after the accounts reload."""
    stack = await stack_factory()
    url = stack.http_url + "/v1/messages"
    acme = await db.fetchval("SELECT id FROM accounts WHERE name = 'acme'")
    key_id, _ = await add_api_key(db, acme, "zeta-key-0003", ("send",))
    await stack.router.reload()
    headers = {"Authorization": "Bearer zeta-key-0003"}
    for _ in range(2):  # the second one is answered from the verified memory
        s, b, _r = await call(http, "POST", url, json_body=msg(), headers=headers)
        assert s == 202, b
    accounts = stack.router.accounts
    assert accounts.cached_key("zeta-key-0003") is not None
    assert accounts.cached_key("zeta-key-0009") is None  # never verified
    # A reload that leaves the key alone keeps it verified: no argon2 run for
    # every customer after each account change somewhere.
    await stack.router.reload()
    assert accounts.cached_key("zeta-key-0003") is not None
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
    await stack.router.reload()
    assert accounts.cached_key("zeta-key-0003") is None
    s, b, r = await call(http, "POST", url, json_body=msg(), headers=headers)
    assert_problem(s, b, r, 401, "unauthorized")
    # A disabled account: its key was verified a moment ago, and is refused.
    s, b, _r = await call(http, "POST", url, json_body=msg(), headers=ACME)
    assert s == 202, b
    await db.execute("UPDATE accounts SET enabled = false WHERE id = $1", acme)
    await stack.router.reload()
    s, b, _r = await call(http, "POST", url, json_body=msg(), headers=ACME)  # verified anew
    assert_problem(s, b, _r, 401, "unauthorized")
    assert accounts.cached_key("acme-key-0001") is None  # verified, but the account is off
    s, b, r = await call(http, "POST", url, json_body=msg(), headers=ACME)
    assert_problem(s, b, r, 401, "unauthorized")


# ----------------------------------------------------------- backpressure


async def test_full_queue_is_429_and_draining_is_503(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    engine = stack.router.engine
    url = stack.http_url + "/v1/messages"
    # Take sim-eu away so its queue cannot drain, then make the queue tiny.
    await stack.sims["sim-eu"].stop()
    await wait_for(lambda: not engine.carriers["sim-eu"].up)
    engine.carriers["sim-eu"].cfg.queue_size = 2
    s, b, _ = await call(http, "POST", url, json_body=msg())
    assert s == 202
    s, b, _ = await call(http, "POST", url, json_body=msg())
    assert s == 202
    s, b, r = await call(http, "POST", url, json_body=msg())
    assert_problem(s, b, r, 429, "queue-full")
    assert int(r.headers["Retry-After"]) >= 1
    assert "errors" not in b
    # A batch: the US recipient still goes (other carrier), the DK one is refused.
    s, b, r = await call(http, "POST", url, json_body={"messages": [msg(to=[US, DK])]})
    assert s == 202, b
    assert b["accepted"] == 1 and b["rejected"] == 1
    assert b["errors"] == [
        {
            "index": 0,
            "recipient": 1,
            "type": PROBLEM_BASE + "queue-full",
            "field": "to",
            "detail": b["errors"][0]["detail"],
        }
    ]
    assert int(r.headers["Retry-After"]) >= 1
    s, b, r = await call(http, "POST", url, json_body={"messages": [msg(), msg(text="")]})
    assert_problem(s, b, r, 429, "queue-full")
    assert {e["type"] for e in b["errors"]} == {
        PROBLEM_BASE + "queue-full",
        PROBLEM_BASE + "invalid-text",
    }
    # Nothing was accepted that the queue could not keep.
    assert engine.carriers["sim-eu"].backlog == 2
    # Draining.
    engine.accepting = False
    s, b, r = await call(http, "POST", url, json_body=msg(to=US))
    assert_problem(s, b, r, 503, "draining")
    assert int(r.headers["Retry-After"]) >= 1


# ------------------------------------------------------------- idempotency


async def test_idempotent_retry_returns_the_original_answer(
    stack_factory: Any, db: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    url = stack.http_url + "/v1/messages"
    key = str(uuid.uuid4())
    hdrs = {**DEMO, "Idempotency-Key": key}
    body = {"messages": [msg(text="once"), msg(to=[US, DK], text="twice?")]}
    s1, b1, r1 = await call(http, "POST", url, json_body=body, headers=hdrs)
    assert s1 == 202 and b1["accepted"] == 3
    assert "Idempotent-Replayed" not in r1.headers
    # Same key, same request (different formatting): the original answer, nothing sent.
    raw = json.dumps(body, indent=2).encode()
    s2, b2, r2 = await call(
        http, "POST", url, data=raw, headers={**hdrs, "Content-Type": "application/json"}
    )
    assert (s2, b2) == (s1, b1)
    assert r2.headers["Idempotent-Replayed"] == "true"
    await wait_for(lambda: stack.sims["sim-eu"].received_count() == 2)
    await asyncio.sleep(0.2)
    assert stack.sims["sim-eu"].received_count() == 2
    assert stack.sims["sim-world"].received_count() == 1
    # Same key, different request.
    s, b, r = await call(http, "POST", url, json_body=msg(text="other"), headers=hdrs)
    assert_problem(s, b, r, 422, "idempotency-key-reused", "Idempotency-Key")
    # The same key belongs to nobody else: acme uses it freely.
    s, b, _ = await call(
        http, "POST", url, json_body=msg(), headers={**ACME, "Idempotency-Key": key}
    )
    assert s == 202 and b["id"] not in json.dumps(b1)
    # Kept in PostgreSQL without numbers or text.
    row = await db.fetchrow(
        "SELECT * FROM idempotency_keys WHERE key = $1 AND account_id = "
        "(SELECT id FROM accounts WHERE name = 'demo')",
        key,
    )
    assert row["status"] == 202
    stored = json.loads(row["body"])
    assert stored == b1
    dump = row["body"] + row["request_hash"]
    for secret in ("4512345678", "14155552671", "once", "twice", "Acme"):
        assert secret not in dump
    # Malformed keys.
    for bad in ("", "a" * 256, "spaced key"):
        s, b, r = await call(
            http, "POST", url, json_body=msg(), headers={**DEMO, "Idempotency-Key": bad}
        )
        assert_problem(s, b, r, 400, "invalid-idempotency-key", "Idempotency-Key")


async def test_idempotency_is_shared_between_nodes(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    node_a = await stack_factory()
    node_b = await stack_factory()
    hdrs = {**DEMO, "Idempotency-Key": str(uuid.uuid4())}
    s1, b1, _ = await call(
        http, "POST", node_a.http_url + "/v1/messages", json_body=msg(), headers=hdrs
    )
    s2, b2, r2 = await call(
        http, "POST", node_b.http_url + "/v1/messages", json_body=msg(), headers=hdrs
    )
    assert s1 == s2 == 202 and b1 == b2
    assert r2.headers["Idempotent-Replayed"] == "true"
    await wait_for(lambda: node_a.sims["sim-eu"].received_count() == 1)
    await asyncio.sleep(0.1)
    assert node_b.sims["sim-eu"].received_count() == 0


async def test_refusals_are_not_kept_so_a_retry_can_succeed(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    url = stack.http_url + "/v1/messages"
    hdrs = {**DEMO, "Idempotency-Key": str(uuid.uuid4())}
    stack.router.engine.accepting = False
    s, b, r = await call(http, "POST", url, json_body=msg(), headers=hdrs)
    assert_problem(s, b, r, 503, "draining")
    stack.router.engine.accepting = True
    s, b, _ = await call(http, "POST", url, json_body=msg(), headers=hdrs)
    assert s == 202


async def test_idempotency_store_claims_expiry_and_in_progress(db: Any) -> None:
    acct = await db.fetchval("INSERT INTO accounts (name) VALUES ('idem') RETURNING id")
    a = IdempotencyStore(db, ttl=0.5, claim_timeout=0.3)
    b = IdempotencyStore(db, ttl=0.5, claim_timeout=0.3)  # another node: empty memory
    key = str(uuid.uuid4())
    assert await a.claim(acct, key, "h1") is None
    busy = await b.claim(acct, key, "h1")
    assert busy is not None and busy.status == 0  # in progress elsewhere -> 409
    await a.put(acct, key, "h1", 202, {"id": "x"})
    done = await b.claim(acct, key, "h1")
    assert done is not None and (done.status, done.body) == (202, {"id": "x"})
    # Expired: the key is free again.
    await asyncio.sleep(0.6)
    assert await b.claim(acct, key, "h2") is None
    # An abandoned claim (node died) is taken over after claim_timeout.
    await asyncio.sleep(0.4)
    assert await a.claim(acct, key, "h3") is None
    await a.release(acct, key)
    assert (
        await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE account_id = $1", acct) == 0
    )
    await a.put(acct, key, "h4", 202, {})  # put without claim: memory only, no row
    assert await a.purge() == 0
    mem = IdempotencyStore(None)
    assert await mem.claim(1, "k", "h") is None
    assert (await mem.claim(1, "k", "h")).status == 0  # type: ignore[union-attr]
    await mem.put(1, "k", "h", 202, {"id": "y"})
    assert (await mem.claim(1, "k", "h")).body == {"id": "y"}  # type: ignore[union-attr]


# ---------------------------------------------------------- secret class


async def test_secret_message_keeps_parts_but_forgets_userref(
    stack_factory: Any, db: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    url = stack.http_url + "/v1/messages"
    s, b, _ = await call(
        http, "POST", url, json_body=msg(**{"class": "secret"}, userref="ref-9", text="y" * 200)
    )
    assert s == 202 and b["parts"] == 2
    mid = b["id"]
    d = stack.router.engine.lookup(mid)
    await wait_for(lambda: d.status is Status.DELIVERED)
    s, b, _ = await call(http, "GET", f"{url}/{mid}")
    assert s == 200
    assert b["class"] == "secret" and b["status"] == "delivered" and b["parts"] == 2
    assert b["userref"] is None
    await stack.router.traffic_log.flush_once()
    row = await db.fetchrow("SELECT source, destination, body FROM traffic_log WHERE id = $1", mid)
    assert row is not None
    assert row["source"] is None and row["destination"] is None and row["body"] is None


async def test_one_future_per_request_waits_for_every_answer_in_order() -> None:
    # The engine may answer at once (a refusal, the in-memory spool) or later
    # (the durable spool); answers before the last hand-over must not end the
    # wait early, and a second answer for one message is ignored.
    out = _Outcomes(asyncio.get_running_loop())
    first = out.slot()
    first("early")  # type: ignore[arg-type]
    late = [out.slot() for _ in range(3)]
    waiter = asyncio.create_task(out.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    late[2]("c")  # type: ignore[arg-type]
    late[0]("a")  # type: ignore[arg-type]
    late[0]("again")  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert not waiter.done()
    late[1]("b")  # type: ignore[arg-type]
    await asyncio.wait_for(waiter, 1)
    assert out.results == ["early", "a", "b", "c"]
    empty = _Outcomes(asyncio.get_running_loop())
    await asyncio.wait_for(empty.wait(), 1)  # nothing handed over: no wait


async def test_keys_sharing_a_prefix_cost_one_failing_argon2_run_once(
    stack_factory: Any, db: Any, http: aiohttp.ClientSession
) -> None:
    """Keys are found by their first 6 characters, so two keys can share a
    prefix. The second key's requests verify it against the first key's hash
    first; that mismatch is remembered once the key proves valid, so its
    later requests are answered from memory, while a wrong key with the same
    prefix is never answered from memory (no timing hint)."""
    stack = await stack_factory()
    url = stack.http_url + "/v1/messages"
    acme = await db.fetchval("SELECT id FROM accounts WHERE name = 'acme'")
    await add_api_key(db, acme, "sk_abc-first-key-0001", ("send",))
    await add_api_key(db, acme, "sk_abc-second-key-0002", ("send",))
    await stack.router.reload()
    accounts = stack.router.accounts
    assert len(accounts.keys_by_prefix["sk_abc"]) == 2
    second = {"Authorization": "Bearer sk_abc-second-key-0002"}
    s, b, _r = await call(http, "POST", url, json_body=msg(), headers=second)
    assert s == 202, b
    found = accounts.cached_key("sk_abc-second-key-0002")
    assert found is not None and found[1].prefix == "sk_abc"
    wrong = {"Authorization": "Bearer sk_abc-wrong-key-0003"}
    for _ in range(2):
        s, b, r = await call(http, "POST", url, json_body=msg(), headers=wrong)
        assert_problem(s, b, r, 401, "unauthorized")
        assert accounts.cached_key("sk_abc-wrong-key-0003") is None
    # A reload keeps what was learnt (it is keyed by the stored hashes), and
    # revoking the first key leaves the second one answered from memory.
    await stack.router.reload()
    assert accounts.cached_key("sk_abc-second-key-0002") is not None
    await db.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE prefix = 'sk_abc'"
        " AND id = (SELECT min(id) FROM api_keys WHERE prefix = 'sk_abc')"
    )
    await stack.router.reload()
    assert len(accounts.keys_by_prefix["sk_abc"]) == 1
    assert accounts.cached_key("sk_abc-second-key-0002") is not None
    s, b, _r = await call(http, "POST", url, json_body=msg(), headers=second)
    assert s == 202, b
