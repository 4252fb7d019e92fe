"""The OpenAPI document tells the truth: it is served without auth, it is a
valid OpenAPI 3.1 / JSON Schema 2020-12 document, real answers of every
status code validate against it (status, media type, body, required
headers), and schemathesis, generating valid and invalid requests from it,
finds no 5xx and no answer outside the document.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import hypothesis
import jsonschema_rs
import pytest
import schemathesis
import schemathesis.checks as checks
from hypothesis import HealthCheck, Phase

from router.config import HttpConfig
from router.ingress.openapi import PROBLEM_TYPES, openapi_document

DEMO = {"Authorization": "Bearer demo-key"}
JSON = {**DEMO, "Content-Type": "application/json"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    root = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "components": doc["components"],
    }
    return jsonschema_rs.Draft202012Validator(root, validate_formats=True)


class Contract:
    """Checks one real answer against the document's operation."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.seen: set[tuple[str, str, int]] = set()

    async def check(self, resp: aiohttp.ClientResponse, method: str, template: str) -> Any:
        op = self.doc["paths"][template][method.lower()]
        code = str(resp.status)
        assert code in op["responses"], f"{method} {template}: {code} is not documented"
        spec = op["responses"][code]
        raw = await resp.read()
        media = resp.content_type
        assert media in spec["content"], f"{method} {template} {code}: {media} not documented"
        body = json.loads(raw)
        errors = [
            e.message
            for e in _validator(self.doc, spec["content"][media]["schema"]).iter_errors(body)
        ]
        assert not errors, (method, template, code, body, errors)
        for name, h in spec.get("headers", {}).items():
            value = resp.headers.get(name)
            if h.get("required"):
                assert value is not None, f"{code} lacks required header {name}"
            if value is not None and "pattern" in h["schema"]:
                assert re.search(h["schema"]["pattern"], value), (name, value)
        self.seen.add((method, template, resp.status))
        return body


async def test_document_is_served_without_auth_and_is_valid(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    async with http.get(stack.http_url + "/v1/openapi.json") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        doc = await resp.json()
    assert doc == json.loads(json.dumps(openapi_document(HttpConfig())))
    assert doc["openapi"].startswith("3.1")
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    description = doc["info"]["description"]
    for slug in PROBLEM_TYPES:
        assert f"`{slug}`" in description
    assert "partial acceptance" in description.lower()
    # The limits follow the configuration.
    small = await stack_factory(http=HttpConfig(max_batch=7))
    async with http.get(small.http_url + "/v1/openapi.json") as resp:
        doc7 = await resp.json()
    assert doc7["components"]["schemas"]["Batch"]["properties"]["messages"]["maxItems"] == 7


async def test_real_answers_of_every_status_match_the_document(
    stack_factory: Any, http: aiohttp.ClientSession, db: Any
) -> None:
    stack = await stack_factory(http=HttpConfig(max_body=4000, max_batch=5))
    async with http.get(stack.http_url + "/v1/openapi.json") as resp:
        contract = Contract(await resp.json())
    url = stack.http_url + "/v1/messages"
    P, G = "/v1/messages", "/v1/messages/{id}"
    good = {"to": "+4512345678", "from": "Acme", "text": "hello", "labels": {"a": "b"}}

    async def post(
        body: Any = None, *, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        payload = data if data is not None else json.dumps(body).encode()
        async with http.post(url, data=payload, headers=headers or JSON) as r:
            return await contract.check(r, "POST", P)

    single = await post(good)
    batch = await post(
        {
            "messages": [
                good,
                {"to": ["+14155552671", "+4512345679"], "from": "Acme", "text": "ж" * 80},
                {"to": "1", "from": "A", "text": "x"},
            ]
        }
    )
    assert batch["accepted"] == 3 and batch["errors"][0]["index"] == 2
    await post(data=b"{", headers=JSON)  # 400
    await post(good, headers={**JSON, "Idempotency-Key": "has space"})  # 400
    await post(good, headers={"Content-Type": "application/json"})  # 401
    await post(good, headers={**JSON, "Authorization": "Bearer nope-nope"})  # 401
    acme = await db.fetchval("SELECT id FROM accounts WHERE name = 'acme'")
    from router.accounts import add_api_key

    await add_api_key(db, acme, "acme-reader", ("read",))
    await stack.router.reload()
    await post(good, headers={**JSON, "Authorization": "Bearer acme-reader"})  # 403
    await post({**good, "text": "x" * 5000})  # 413
    await post({**good, "to": ["+4512345678"] * 6})  # 413
    await post(good, headers={**DEMO, "Content-Type": "text/plain"})  # 415
    await post({**good, "from": ""})  # 422
    await post({"messages": [{"to": "1"}]})  # 422 batch
    await post({**good, "send_at": "2030-01-01T00:00:00Z"})  # 422
    key = {**JSON, "Idempotency-Key": str(uuid.uuid4())}
    first = await post(good, headers=key)
    async with http.post(url, data=json.dumps(good).encode(), headers=key) as r:
        assert await contract.check(r, "POST", P) == first  # replay
    await post({**good, "text": "other"}, headers=key)  # 422 reused
    engine = stack.router.engine
    await stack.sims["sim-eu"].stop()
    for _ in range(200):
        if not engine.carriers["sim-eu"].up:
            break
        await asyncio.sleep(0.02)
    engine.carriers["sim-eu"].cfg.queue_size = 0
    await post(good)  # 429
    await post({"messages": [good, {**good, "to": "+14155552671"}]})  # 202 + R-A
    engine.accepting = False
    await post(good)  # 503
    engine.accepting = True

    async def get(mid: str, headers: dict[str, str] | None = None) -> Any:
        async with http.get(f"{url}/{mid}", headers=DEMO if headers is None else headers) as r:
            return await contract.check(r, "GET", G)

    status = await get(single["id"])
    assert status["labels"] == {"a": "b"}
    await get(batch["messages"][1]["id"])
    await get("0" * 20)  # 404
    await get(single["id"], headers={})  # 401
    await add_api_key(db, acme, "acme-admin1", ("admin",))
    await stack.router.reload()
    await get(single["id"], headers={"Authorization": "Bearer acme-admin1"})  # 403
    codes = {(m, s) for m, _, s in contract.seen}
    assert {("POST", c) for c in (202, 400, 401, 403, 413, 415, 422, 429, 503)} <= codes
    assert {("GET", c) for c in (200, 401, 403, 404)} <= codes


def _run_schemathesis(
    base_url: str, max_examples: int, seen: dict[tuple[str, str, int], int]
) -> list[str]:
    """Generate requests from the served document and call the live router."""
    # 413 (too many recipients, too large a body) is a refusal too.
    config = schemathesis.Config.from_dict(
        {
            "checks": {
                "negative_data_rejection": {
                    "expected-statuses": [
                        "400",
                        "401",
                        "403",
                        "404",
                        "409",
                        "413",
                        "415",
                        "422",
                        "429",
                    ]
                }
            }
        }
    )
    schema = schemathesis.openapi.from_url(base_url + "/v1/openapi.json", config=config)
    selected = [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
        checks.response_headers_conformance,
        checks.negative_data_rejection,
    ]
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if op.path != "/v1/openapi.json":
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @hypothesis.settings(
                max_examples=max_examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                resp = case.call_and_validate(
                    base_url=base_url, headers=dict(DEMO), checks=selected, timeout=10
                )
                k = (case.method.upper(), case.path, resp.status_code)
                seen[k] = seen.get(k, 0) + 1

            try:
                run()
            except Exception as exc:  # collect every operation's failure, then report
                failures.append(f"{op.method.upper()} {op.path} [{mode.value}]: {exc}")
    return failures


async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    stack_factory: Any,
) -> None:
    stack = await stack_factory()
    seen: dict[tuple[str, str, int], int] = {}
    failures = await asyncio.to_thread(_run_schemathesis, stack.http_url, 25, seen)
    assert not failures, "\n\n".join(failures)
    # The run really exercised the API: accepted and refused sends, lookups.
    print(sorted(seen.items()))
    # How many generated sends are valid varies between runs (4-7 seen on a
    # loaded machine) although generation is derandomised; at least one must
    # be accepted for the run to have exercised the success path.
    assert seen.get(("POST", "/v1/messages", 202), 0) >= 1
    assert sum(n for (m, _, c), n in seen.items() if m == "POST" and c == 422) >= 5
    assert seen.get(("GET", "/v1/messages/{id}", 404), 0) >= 5
