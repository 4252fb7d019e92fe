"""The HTTP API contract: limits, patterns, problem types and the OpenAPI 3.1
document served at ``GET /v1/openapi.json``.

The handlers in :mod:`router.ingress.http` enforce the limits and patterns
defined here, so the document and the behaviour cannot drift apart silently;
``tests/test_openapi.py`` checks real answers against the document. This
module only builds data: no I/O, and no example ever holds a real number.
"""

from __future__ import annotations

import copy
from typing import Any

from ..config import HttpConfig

PROBLEM_BASE = "https://sms-router.dev/problems/"

# Field limits (the handler enforces exactly these).
USERREF_MAX = 64
CALLBACK_URL_MAX = 2048
LABELS_MAX = 10
LABEL_KEY_MAX = 32
LABEL_VALUE_MAX = 64
MAX_PARTS_DEFAULT = 10
MAX_PARTS_LIMIT = 255
VALIDITY_DEFAULT = 48 * 3600
VALIDITY_MAX = 7 * 24 * 3600
IDEMPOTENCY_KEY_MAX = 255
IDEMPOTENCY_TTL = 24 * 3600

# Patterns valid both as ECMA 262 (JSON Schema) and Python ``re`` (used with
# ``re.fullmatch`` by the handler, so ``$`` never admits a trailing newline).
E164_PATTERN = r"^\+?[1-9][0-9]{6,14}$"
SENDER_ALNUM_PATTERN = r"^[A-Za-z0-9 .\-_&'+!#()@:/]{1,11}$"
SENDER_NUMERIC_PATTERN = r"^\+?[0-9]{1,15}$"
CALLBACK_URL_PATTERN = r"^https?://[^\s/?#@]+(?:[/?#]\S*)?$"
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]{1,255}$"
MESSAGE_ID_PATTERN = r"^[0-9a-f]{20}$"

# Every problem ``type`` this API answers with: slug -> (HTTP status, title).
# Slugs are stable; clients may switch on them. Engine refusals map their
# ``reason`` (no_route, queue_full, draining, ...) to the slug with '-'.
PROBLEM_TYPES: dict[str, tuple[int, str]] = {
    "invalid-json": (400, "Body is not strict JSON"),
    "invalid-idempotency-key": (400, "Idempotency-Key header is malformed"),
    "unauthorized": (401, "Missing or invalid API key"),
    "forbidden": (403, "API key lacks the permission"),
    "not-found": (404, "No such resource"),
    "not-cancelable": (409, "The message is no longer scheduled; it cannot be canceled"),
    "method-not-allowed": (405, "Method not allowed"),
    "idempotency-key-in-progress": (409, "A request with this Idempotency-Key is in progress"),
    "body-too-large": (413, "Request body too large"),
    "batch-too-large": (413, "Too many recipients in one request"),
    "unsupported-media-type": (415, "Content-Type must be application/json"),
    "invalid-field": (422, "Invalid field"),
    "invalid-destination": (422, "Invalid destination"),
    "invalid-sender": (422, "Invalid sender"),
    "invalid-text": (422, "Invalid text"),
    "too-many-parts": (422, "Text needs more parts than max_parts"),
    "invalid-send-at": (422, "send_at is not an RFC 3339 date-time with an offset"),
    "schedule-too-far": (422, "send_at is further ahead than this router keeps messages"),
    "schedule-unavailable": (422, "Scheduled sending is not available for this message"),
    "expires-before-send": (422, "The message would expire before its send time"),
    "no-route": (422, "No route to the destination"),
    "opted-out": (422, "The recipient opted out of this account's messages"),
    "batch-rejected": (422, "No message in the request was accepted"),
    "idempotency-key-reused": (422, "Idempotency-Key reused with a different request"),
    "queue-full": (429, "Carrier queues are full; retry later"),
    "account-rate": (429, "The account's messages-per-second limit is reached"),
    "spool-full": (429, "The durable spool is full; retry later"),
    "internal-error": (500, "Internal error"),
    "draining": (503, "Router is shutting down; retry later or elsewhere"),
    "idempotency-unavailable": (503, "Idempotency store unavailable; retry later"),
    "database-unavailable": (503, "Database unavailable; retry later"),
    "not-durable": (503, "The message could not be stored; retry"),
    "memory-high": (503, "The router is at its memory limit; retry later"),
}

_DESCRIPTION = (
    f"""\
Submit SMS and read their status.

**Authentication**: `Authorization: Bearer <API key>`. A missing or unknown key
answers 401 with `WWW-Authenticate`; a valid key without the permission
answers 403. Sending needs the `send` permission; reading a message's status
needs `send` or `read`. Messages of another account answer 404, exactly as
ids that do not exist.

**Requests**: `Content-Type: application/json` (UTF-8), strict JSON: `NaN`,
`Infinity` and duplicate object keys are refused (400 `invalid-json`). The
body is one message object or `{{"messages": [...]}}`; a message's `to` is one
number or a list. At most `http.max_batch` (default 10,000) recipients per
request (413 `batch-too-large`), at most `http.max_body` bytes (413
`body-too-large`).

**Batches: partial acceptance.** Every message item is checked on its own
against the `Message` schema and the router's rules; well-formed items are
accepted even when others are not. The 202 answer lists each accepted
recipient (`index` of the item in `messages`, `recipient` position in its
`to` list, `id`, `parts`, `encoding`) and each refusal in `errors` (`index`,
`recipient` when only that recipient was refused, `type`, `field`, `detail`).
A malformed item (any field, including one bad number in its `to` list) is
refused as a whole; routing and backpressure refusals (`no-route`,
`queue-full`, `draining`) are per recipient. When nothing is accepted the
answer is 422 `batch-rejected`, or 429/503 with `Retry-After` when a
recipient was refused for backpressure. Accepted messages are never rolled
back, so resend only the refused ones (with a new Idempotency-Key).

**Backpressure**: the router never accepts what it cannot keep, and answers
202 only once every accepted message is durable. A full carrier queue
answers 429 `queue-full` (likewise `account-rate`, `spool-full`), a draining
router 503 `draining` (likewise `not-durable`), all with `Retry-After`
(seconds).

**Idempotency**: send `Idempotency-Key` (1-{IDEMPOTENCY_KEY_MAX} visible ASCII
characters) on POST. A retry with the same key and the same body within 24
hours gets the original 202 answer again (header `Idempotent-Replayed:
true`) and sends nothing; the same key with a different body answers 422
`idempotency-key-reused`; a retry while the first request is still being
handled answers 409 `idempotency-key-in-progress`. Only 202 answers are
kept: a refused request may be retried with the same key.

**Errors** are `application/problem+json` (RFC 9457) with a stable `type`
`{PROBLEM_BASE}<slug>`, and `field` naming the field at fault. Slugs:
"""
    + "\n".join(
        f"- `{slug}` ({status}): {title}" for slug, (status, title) in PROBLEM_TYPES.items()
    )
    + """

**Scheduling**: `send_at` (RFC 3339 with an offset, e.g.
`2026-12-01T09:00:00+01:00`) in the future makes the message wait in the
router's durable spool (status `scheduled`) until then; it is sent within
about a second of that time. A time in the past means "now". At most
`delivery.max_schedule_ahead` ahead (default 30 days; 422
`schedule-too-far`). `validity_seconds` counts from `send_at`. A scheduled
message is checked (sender, route, opt-out, rate) when it is accepted and
routed when it falls due. `DELETE /v1/messages/{id}` cancels it while it
still waits (status `canceled`, webhook sent); afterwards 409
`not-cancelable`.

**Delivery webhooks**: on each final status (delivered, failed, expired,
rejected, canceled) the router POSTs `{"id", "userref", "to", "status", "error",
"time"}` to the message's `callback_url`, else the account's webhook URL;
`to` is omitted for `secret` messages. Header `X-SMSRouter-Signature:
t=<unix seconds>,v1=<hex HMAC-SHA256(account webhook secret,
"<t>.<raw body>")>`. Non-2xx answers and timeouts are retried with
exponential backoff (30 s doubling to 1 h) for up to 24 hours.

**Privacy**: answers never echo a phone number, sender or text. `labels` are
kept in memory only (returned by GET while the router remembers the
message) and are never logged or stored.
"""
)


def _problem_response(description: str, *, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }
    if headers:
        out["headers"] = headers
    return out


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
_WWW_AUTHENTICATE = {
    "WWW-Authenticate": {
        "description": "Bearer challenge (RFC 6750).",
        "required": True,
        "schema": {"type": "string"},
    }
}


def _schemas(max_batch: int) -> dict[str, Any]:
    item_error = {
        "type": "object",
        "required": ["index", "type", "detail"],
        "additionalProperties": False,
        "properties": {
            "index": {
                "type": "integer",
                "minimum": 0,
                "description": "Position of the item in `messages` (0 for a single message).",
            },
            "recipient": {
                "type": "integer",
                "minimum": 0,
                "description": "Position in the item's `to` list, when only that "
                "recipient was refused.",
            },
            "type": {"type": "string", "format": "uri"},
            "field": {"type": "string"},
            "detail": {"type": "string"},
        },
    }
    return {
        "Message": {
            "type": "object",
            "description": "One message to one or several recipients.",
            "required": ["to", "from", "text"],
            "additionalProperties": False,
            "properties": {
                "to": {
                    "description": "Recipient(s): international numbers in E.164, '+' optional.",
                    "oneOf": [
                        {"type": "string", "pattern": E164_PATTERN},
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": max_batch,
                            "items": {"type": "string", "pattern": E164_PATTERN},
                        },
                    ],
                },
                "from": {
                    "type": "string",
                    "description": "Sender id: alphanumeric (1-11 characters) or numeric "
                    "(up to 15 digits, '+' optional).",
                    "anyOf": [
                        {"pattern": SENDER_ALNUM_PATTERN},
                        {"pattern": SENDER_NUMERIC_PATTERN},
                    ],
                },
                "text": {
                    "type": "string",
                    "minLength": 1,
                    "description": "Sent as GSM 03.38 when every character fits, else UCS2. "
                    "NUL and unpaired surrogates are refused.",
                },
                "class": {
                    "type": "string",
                    "enum": ["standard", "secret"],
                    "description": "Default: the account's default class. `secret` messages "
                    "are never written to the traffic log or any log.",
                },
                "userref": {
                    "type": "string",
                    "maxLength": USERREF_MAX,
                    "description": "Your reference, echoed in status and webhooks.",
                },
                "callback_url": {
                    "type": "string",
                    "maxLength": CALLBACK_URL_MAX,
                    "pattern": CALLBACK_URL_PATTERN,
                    "description": "Webhook for this message's final status "
                    "(default: the account's webhook URL).",
                },
                "validity_seconds": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": VALIDITY_MAX,
                    "default": VALIDITY_DEFAULT,
                },
                "send_at": {
                    "type": "string",
                    "format": "date-time",
                    "description": "Send at this time (RFC 3339 with an offset); past = now. "
                    "The message waits in the durable spool until then.",
                },
                "max_parts": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_PARTS_LIMIT,
                    "default": MAX_PARTS_DEFAULT,
                    "description": "Refuse (422 `too-many-parts`) a text needing more parts.",
                },
                "labels": {
                    "type": "object",
                    "maxProperties": LABELS_MAX,
                    "propertyNames": {"minLength": 1, "maxLength": LABEL_KEY_MAX},
                    "additionalProperties": {"type": "string", "maxLength": LABEL_VALUE_MAX},
                    "description": "Up to 10 short string pairs, kept in memory only.",
                },
            },
        },
        "Batch": {
            "type": "object",
            "required": ["messages"],
            "additionalProperties": False,
            "properties": {
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": max_batch,
                    "description": "Items are Message objects, each checked on its own "
                    "(partial acceptance): a malformed item is refused in "
                    "`errors` without refusing the others.",
                    "items": {},
                },
            },
        },
        "Accepted": {
            "type": "object",
            "description": "A single message to a single recipient was accepted.",
            "required": ["id", "status", "parts", "encoding"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string", "pattern": MESSAGE_ID_PATTERN},
                "status": {"enum": ["accepted", "scheduled"]},
                "parts": {"type": "integer", "minimum": 1},
                "encoding": {"enum": ["gsm7", "ucs2"]},
                "send_at": {"type": "string", "format": "date-time"},
            },
        },
        "BatchAccepted": {
            "type": "object",
            "description": "At least one recipient was accepted.",
            "required": ["accepted", "rejected", "messages", "errors"],
            "additionalProperties": False,
            "properties": {
                "accepted": {"type": "integer", "minimum": 1},
                "rejected": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Recipients not accepted.",
                },
                "messages": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "recipient", "id", "status", "parts", "encoding"],
                        "additionalProperties": False,
                        "properties": {
                            "index": {"type": "integer", "minimum": 0},
                            "recipient": {"type": "integer", "minimum": 0},
                            "id": {"type": "string", "pattern": MESSAGE_ID_PATTERN},
                            "status": {"enum": ["accepted", "scheduled"]},
                            "parts": {"type": "integer", "minimum": 1},
                            "encoding": {"enum": ["gsm7", "ucs2"]},
                            "send_at": {"type": "string", "format": "date-time"},
                        },
                    },
                },
                "errors": {"type": "array", "items": item_error},
            },
        },
        "MessageStatus": {
            "type": "object",
            "required": [
                "id",
                "status",
                "class",
                "parts",
                "encoding",
                "country",
                "carrier",
                "error",
                "userref",
                "labels",
                "accepted_at",
                "updated_at",
                "expires_at",
            ],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string", "pattern": MESSAGE_ID_PATTERN},
                "status": {
                    "enum": [
                        "accepted",
                        "scheduled",
                        "queued",
                        "submitted",
                        "delivered",
                        "failed",
                        "expired",
                        "rejected",
                        "canceled",
                        "unknown",
                    ]
                },
                "class": {"enum": ["standard", "secret"]},
                "parts": {"type": "integer", "minimum": 0},
                "encoding": {"enum": ["gsm7", "ucs2", "other"]},
                "country": {
                    "type": "string",
                    "description": "ISO 3166 alpha-2 of the destination, '' if unknown.",
                },
                "carrier": {"type": ["string", "null"]},
                "error": {"type": ["string", "null"]},
                "userref": {
                    "type": ["string", "null"],
                    "description": "null once a secret message's fate is final.",
                },
                "labels": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
                "accepted_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "expires_at": {"type": "string", "format": "date-time"},
                "send_at": {
                    "type": "string",
                    "format": "date-time",
                    "description": "Present for a scheduled message.",
                },
            },
        },
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details.",
            "required": ["type", "title", "status"],
            "additionalProperties": False,
            "properties": {
                "type": {"type": "string", "format": "uri"},
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "field": {"type": "string"},
                "errors": {"type": "array", "items": item_error},
            },
        },
        "Webhook": {
            "type": "object",
            "description": "The body POSTed to a callback URL on a final status.",
            "required": ["id", "userref", "status", "error", "time"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string"},
                "userref": {"type": ["string", "null"]},
                "to": {
                    "type": "string",
                    "description": "'+' and E.164 digits; omitted for secret messages.",
                },
                "status": {
                    "enum": ["delivered", "failed", "expired", "rejected", "canceled", "unknown"]
                },
                "error": {"type": ["string", "null"]},
                "time": {"type": "string", "format": "date-time"},
            },
        },
    }


_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": MESSAGE_ID_PATTERN},
}


def _document(max_batch: int) -> dict[str, Any]:
    auth = {
        "401": _problem_response("Missing or invalid API key.", headers=_WWW_AUTHENTICATE),
        "403": _problem_response("The key lacks the permission."),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "sms-router HTTP API", "version": "1.0.0", "description": _DESCRIPTION},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/v1/messages": {
                "post": {
                    "operationId": "sendMessages",
                    "summary": "Send one message or a batch",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": IDEMPOTENCY_KEY_MAX,
                                "pattern": IDEMPOTENCY_KEY_PATTERN,
                            },
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/Message"},
                                        {"$ref": "#/components/schemas/Batch"},
                                    ]
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "Accepted: a single message (Accepted) or a batch / "
                            "several recipients (BatchAccepted).",
                            "headers": {
                                "Retry-After": {
                                    "description": "Present when some recipients were "
                                    "refused for backpressure.",
                                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                                },
                                "Idempotent-Replayed": {
                                    "description": "'true' on a replayed answer.",
                                    "schema": {"type": "string"},
                                },
                            },
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "oneOf": [
                                            {"$ref": "#/components/schemas/Accepted"},
                                            {"$ref": "#/components/schemas/BatchAccepted"},
                                        ]
                                    }
                                }
                            },
                        },
                        "400": _problem_response("Malformed JSON or Idempotency-Key."),
                        **auth,
                        "409": _problem_response(
                            "Same Idempotency-Key still in progress.", headers=_RETRY_AFTER
                        ),
                        "413": _problem_response("Body or batch too large."),
                        "415": _problem_response("Not application/json."),
                        "422": _problem_response(
                            "Refused: invalid fields, no route, unsupported feature, reused key."
                        ),
                        "429": _problem_response("Carrier queues full.", headers=_RETRY_AFTER),
                        "500": _problem_response("Internal error (no details leave)."),
                        "503": _problem_response(
                            "Draining or idempotency store unavailable.", headers=_RETRY_AFTER
                        ),
                    },
                },
            },
            "/v1/messages/{id}": {
                "get": {
                    "operationId": "getMessage",
                    "summary": "Status of one message of this account",
                    "parameters": [_ID_PARAM],
                    "responses": {
                        "200": {
                            "description": "The message's status.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/MessageStatus"}
                                }
                            },
                        },
                        **auth,
                        "404": _problem_response("No such message for this account."),
                        "500": _problem_response("Internal error (no details leave)."),
                    },
                },
                "delete": {
                    "operationId": "cancelMessage",
                    "summary": "Cancel a scheduled message that is still waiting",
                    "parameters": [_ID_PARAM],
                    "responses": {
                        "200": {
                            "description": "Canceled: the message's status (now `canceled`).",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/MessageStatus"}
                                }
                            },
                        },
                        **auth,
                        "404": _problem_response("No such message for this account."),
                        "409": _problem_response("The message is no longer scheduled."),
                        "500": _problem_response("Internal error (no details leave)."),
                        "503": _problem_response("Database unavailable.", headers=_RETRY_AFTER),
                    },
                },
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "getOpenApi",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1 document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                },
            },
        },
        "webhooks": {
            "messageStatus": {
                "post": {
                    "summary": "Final status of a message",
                    "parameters": [
                        {
                            "name": "X-SMSRouter-Signature",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Webhook"}}
                        }
                    },
                    "responses": {
                        "200": {"description": "Any 2xx acknowledges; anything else is retried."}
                    },
                },
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(max_batch),
        },
    }


_CACHE: dict[int, dict[str, Any]] = {}


def openapi_document(http: HttpConfig | None = None) -> dict[str, Any]:
    """The document for these limits (a fresh copy; callers may change it)."""
    max_batch = (http or HttpConfig()).max_batch
    if max_batch not in _CACHE:
        _CACHE[max_batch] = _document(max_batch)
    return copy.deepcopy(_CACHE[max_batch])
