"""The HTTP front door (aiohttp): submit messages, read their status.

Handlers parse and validate, call Engine.accept, shape the answer. Errors
are application/problem+json with a stable ``type``; bodies never echo a
number or text back, and no stack trace ever leaves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..accounts import Account, AccountStore, ApiKey
from ..config import Config
from ..engine import Engine, Rejected
from ..model import Message, MessageClass, Origin, new_message_id
from ..observe import metrics
from ..text.segment import encode_text, part_count, split
from .validate import InvalidField, check_destination, check_sender

ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
ACCOUNTS: web.AppKey[AccountStore] = web.AppKey("accounts", AccountStore)
CONFIG: web.AppKey[Config] = web.AppKey("config", Config)

PROBLEM = "application/problem+json"
DEFAULT_VALIDITY = 48 * 3600
MAX_VALIDITY = 7 * 24 * 3600
_FIELDS = {"to", "from", "text", "class", "userref", "callback_url", "validity_seconds",
           "send_at", "max_parts", "labels"}


def problem(status: int, type_: str, title: str, detail: str | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"type": f"https://sms-router.dev/problems/{type_}", "title": title,
                            "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM,
                        headers=headers)


class BadItem(Exception):
    def __init__(self, type_: str, field: str, detail: str) -> None:
        super().__init__(detail)
        self.type = type_
        self.field = field
        self.detail = detail


def _reject_constant(value: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate key in JSON object")
        out[k] = v
    return out


@web.middleware
async def errors_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != PROBLEM:
            resp = problem(exc.status, "http-error", exc.reason)
        else:
            raise
    except Exception:  # never a stack trace to the client, never the payload to the log
        resp = problem(500, "internal-error", "internal error")
    metrics.HTTP_REQUESTS.labels(route, str(resp.status)).inc()
    return resp


async def _authenticate(request: web.Request, permission: str) -> tuple[Account, ApiKey] | web.Response:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or len(header) < 8:
        return problem(401, "unauthorized", "missing or malformed bearer token",
                       headers={"WWW-Authenticate": 'Bearer realm="sms-router"'})
    found = await request.app[ACCOUNTS].authenticate_key(header[7:].strip())
    if found is None:
        return problem(401, "unauthorized", "invalid API key",
                       headers={"WWW-Authenticate": 'Bearer realm="sms-router", error="invalid_token"'})
    if permission not in found[1].permissions:
        return problem(403, "forbidden", f"this key lacks the '{permission}' permission")
    return found


def _build(engine: Engine, account: Account, item: Any, to: str, now: float) -> Message:
    if not isinstance(item, dict):
        raise BadItem("invalid-field", "", "each message must be a JSON object")
    unknown = set(item) - _FIELDS
    if unknown:
        name = sorted(unknown)[0]
        raise BadItem("invalid-field", name, f"unknown field '{name}'")
    try:
        destination = check_destination(to)
    except InvalidField as exc:
        raise BadItem("invalid-destination", "to", str(exc)) from None
    sender = item.get("from")
    if not isinstance(sender, str):
        raise BadItem("invalid-sender", "from", "from: a sender id string is required")
    try:
        source, ton, npi = check_sender(sender)
    except InvalidField as exc:
        raise BadItem("invalid-sender", "from", str(exc)) from None
    text = item.get("text")
    if not isinstance(text, str) or not text:
        raise BadItem("invalid-text", "text", "text: a non-empty string is required")
    cls = item.get("class", account.default_class.value)
    if cls not in ("standard", "secret"):
        raise BadItem("invalid-field", "class", "class: expected 'standard' or 'secret'")
    validity = item.get("validity_seconds", DEFAULT_VALIDITY)
    if not isinstance(validity, int) or isinstance(validity, bool) or not 1 <= validity <= MAX_VALIDITY:
        raise BadItem("invalid-field", "validity_seconds",
                      f"validity_seconds: an integer from 1 to {MAX_VALIDITY}")
    if item.get("send_at") is not None:
        raise BadItem("unsupported", "send_at", "send_at: scheduled sending is not available yet")
    userref = item.get("userref")
    if userref is not None and (not isinstance(userref, str) or len(userref) > 64):
        raise BadItem("invalid-field", "userref", "userref: a string of at most 64 characters")
    callback = item.get("callback_url")
    if callback is not None and (not isinstance(callback, str) or
                                 not callback.startswith(("http://", "https://"))):
        raise BadItem("invalid-field", "callback_url", "callback_url: an http(s) URL")
    enc = encode_text(text)
    parts = part_count(enc)
    max_parts = item.get("max_parts", 10)
    if not isinstance(max_parts, int) or isinstance(max_parts, bool) or not 1 <= max_parts <= 255:
        raise BadItem("invalid-field", "max_parts", "max_parts: an integer from 1 to 255")
    if parts > max_parts:
        raise BadItem("too-many-parts", "text",
                      f"text needs {parts} parts, more than max_parts={max_parts}")
    segments = tuple(split(enc, ref=engine.rng.randrange(256)))
    secret = cls == "secret"
    return Message(
        id=new_message_id(), account_id=account.id, account=account.name, origin=Origin.HTTP,
        msg_class=MessageClass(cls), source=source, source_ton=ton, source_npi=npi,
        destination=destination, country=engine.countries.country(destination),
        data_coding=enc.data_coding, esm_class=0x40 if len(segments) > 1 else 0,
        segments=segments, text=None if secret else text, registered_delivery=1,
        accepted_at=now, expires_at=now + validity, userref=userref, callback_url=callback,
    )


async def post_messages(request: web.Request) -> web.Response:
    auth = await _authenticate(request, "send")
    if isinstance(auth, web.Response):
        return auth
    account, _ = auth
    if request.content_type != "application/json":
        return problem(415, "unsupported-media-type", "Content-Type must be application/json")
    cfg = request.app[CONFIG]
    try:
        raw = await request.read()
        doc = json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except web.HTTPRequestEntityTooLarge:
        return problem(413, "body-too-large", f"body exceeds {cfg.http.max_body} bytes")
    except (ValueError, UnicodeDecodeError) as exc:
        return problem(400, "invalid-json", "request body is not valid JSON",
                       detail=str(exc)[:200] if "duplicate" in str(exc) or "NaN" in str(exc) else None)
    batch = isinstance(doc, dict) and "messages" in doc
    items = doc["messages"] if batch else [doc]
    if not isinstance(items, list) or not items:
        return problem(400, "invalid-field", "messages must be a non-empty list", field="messages")
    # Expand recipients: "to" may be a list.
    expanded: list[tuple[int, Any, Any]] = []
    for i, item in enumerate(items):
        to = item.get("to") if isinstance(item, dict) else None
        for t in (to if isinstance(to, list) else [to]):
            expanded.append((i, item, t))
    if len(expanded) > cfg.http.max_batch:
        return problem(413, "batch-too-large",
                       f"at most {cfg.http.max_batch} recipients per request")
    engine = request.app[ENGINE]
    now = time.time()
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    throttled: Rejected | None = None
    for index, item, to in expanded:
        try:
            if not isinstance(to, str):
                raise BadItem("invalid-destination", "to", "to: a number or a list of numbers")
            msg = _build(engine, account, item, to, now)
            engine.accept(msg)
        except BadItem as exc:
            metrics.REJECTED.labels("http", account.name, exc.type).inc()
            errors.append({"index": index, "type": exc.type, "field": exc.field, "detail": exc.detail})
            continue
        except Rejected as exc:
            metrics.REJECTED.labels("http", account.name, exc.reason).inc()
            if exc.http_status in (429, 503):
                throttled = exc
                metrics.THROTTLE_SENT.labels("http", exc.reason).inc()
            errors.append({"index": index, "type": exc.reason, "detail": exc.detail})
            continue
        results.append({"index": index, "id": msg.id, "parts": msg.parts,
                        "encoding": "gsm7" if msg.data_coding == 0 else "ucs2",
                        "status": "accepted"})
    if not results:
        if throttled is not None:
            return problem(throttled.http_status, throttled.reason, "cannot accept now",
                           detail=throttled.detail,
                           headers={"Retry-After": str(int(throttled.retry_after or 1))},
                           errors=errors)
        if not batch:
            e = errors[0]
            status = 422
            return problem(status, e["type"], "message rejected", detail=e["detail"],
                           field=e.get("field"))
        return problem(422, "batch-rejected", "no message in the batch was accepted", errors=errors)
    if not batch:
        r = results[0]
        return web.json_response({"id": r["id"], "parts": r["parts"], "encoding": r["encoding"],
                                  "status": "accepted"}, status=202)
    return web.json_response({"accepted": len(results), "rejected": len(errors),
                              "messages": results, "errors": errors}, status=202)


async def get_message(request: web.Request) -> web.Response:
    auth = await _authenticate(request, "send")
    if isinstance(auth, web.Response):
        return auth
    account, _ = auth
    d = request.app[ENGINE].lookup(request.match_info["id"])
    if d is None or d.message.account_id != account.id:
        return problem(404, "not-found", "no such message for this account")
    m = d.message
    return web.json_response({
        "id": m.id, "status": d.status.value, "class": m.msg_class.value, "parts": m.parts,
        "country": m.country, "carrier": d.carrier, "error": d.error, "userref": m.userref,
        "accepted_at": m.accepted_at, "updated_at": d.updated_at,
    })


def make_api(cfg: Config, engine: Engine, accounts: AccountStore) -> web.Application:
    app = web.Application(client_max_size=cfg.http.max_body, middlewares=[errors_middleware])
    app[ENGINE] = engine
    app[ACCOUNTS] = accounts
    app[CONFIG] = cfg
    app.router.add_post("/v1/messages", post_messages)
    app.router.add_get("/v1/messages/{id}", get_message)
    return app
