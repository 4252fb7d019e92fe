"""``listen.workers``: several router processes behind the same ports.

The router runs as a real subprocess tree (supervisor + workers), the
carrier simulator in the test's loop; customers connect over real TCP.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from router.accounts import add_api_key, create_account
from router.config import CarrierConfig, Config, ConfigError, parse_config, share_config
from router.shares import HEADROOM, RESERVE, allocate, divide
from router.sim import CarrierSimulator, SimConfig
from router.smpp.constants import Status
from router.workers import hold_port, merge_expositions
from tests.esme import TestEsme as Esme
from tests.esme import connect
from tests.routerproc import (
    carrier_got_all,
    carrier_toml,
    free_ports,
    listen_toml,
    parse_metrics,
    spawn_router,
    start_router,
    stop_router,
)

# ------------------------------------------------------------------ pure parts


def test_share_config_divides_the_totals() -> None:
    cfg = Config(
        carriers=[
            CarrierConfig("a", tps=300.0, queue_size=1001, sessions=5),
            CarrierConfig("b", tps=10.0, queue_size=10, sessions=1),
        ]
    )
    shares = [share_config(Config(carriers=[_copy(c) for c in cfg.carriers]), i, 2) for i in (0, 1)]
    a0, a1 = (s.carriers[0] for s in shares)
    assert (a0.tps, a1.tps) == (300.0, 300.0)  # rates are shared by demand (router/shares.py)
    assert a0.queue_size == a1.queue_size == 501  # rounded up: never below the total
    assert (a0.sessions, a1.sessions) == (3, 2)  # 5 sessions over 2 workers
    b0, b1 = (s.carriers[1] for s in shares)
    assert (b0.sessions, b1.sessions) == (1, 0)  # worker 1 sends through worker 0's bind
    one = share_config(Config(carriers=[_copy(cfg.carriers[0])]), 0, 1)
    assert (one.carriers[0].tps, one.carriers[0].sessions) == (300.0, 5)


def test_rates_are_divided_by_demand() -> None:
    # Nobody asked: an even split. One member: all of it.
    assert divide([0.0, 0.0], 100.0) == [0.5, 0.5]
    assert divide([5.0], 100.0) == [1.0]
    # Only one worker has traffic (one bind): it gets all but the idle one's
    # floor, instead of half.
    busy, idle = divide([300.0, 0.0], 100.0)
    assert busy == pytest.approx(1 - RESERVE / 2) and idle == pytest.approx(RESERVE / 2)
    # Everyone's want fits: each gets it, the rest goes by demand.
    f = divide([10.0, 30.0], 100.0)
    assert f[0] * 100 >= 10 * HEADROOM and f[1] * 100 >= 30 * HEADROOM
    assert f[1] > f[0]
    # Over-subscribed: max-min fair. A small demand is met whole, the big
    # ones share what is left equally.
    f = divide([5.0, 200.0, 400.0], 100.0)
    assert f[0] * 100 == pytest.approx(RESERVE / 3 * 100 + 5 * HEADROOM)
    assert f[1] == pytest.approx(f[2])
    for demands in ([1.0, 0.0, 0.0], [50.0, 50.0], [1e6, 1.0], [3.0, 7.0, 0.0, 90.0]):
        assert sum(divide(demands, 40.0)) == pytest.approx(1.0)  # never above the total
        assert min(divide(demands, 40.0)) > 0  # nobody starved


def test_allocate_shares_each_limit_over_the_live_workers() -> None:
    reports = {
        0: {"a": [[7, 100.0, 50.0]], "c": [["sim", 10.0, 200.0]]},
        1: {"a": [], "c": [["sim", 30.0, 200.0]]},
        2: None,  # no report yet (just started)
    }
    plan = allocate(reports, [0, 1, 2])
    assert {w: p["n"] for w, p in plan.items()} == {0: 3, 1: 3, 2: 3}
    assert plan[0]["a"]["7"] > 0.9 and plan[1]["a"]["7"] == plan[2]["a"]["7"]
    assert sum(plan[w]["c"]["sim"] for w in plan) == pytest.approx(1.0, abs=1e-5)
    assert plan[1]["c"]["sim"] > plan[0]["c"]["sim"] > plan[2]["c"]["sim"]
    # A dead worker is no member: the survivors share its part.
    plan = allocate(reports, [0, 1])
    assert plan[0]["n"] == 2 and "2" not in plan
    assert sum(plan[w]["a"]["7"] for w in plan) == pytest.approx(1.0, abs=1e-5)
    assert allocate({}, [0]) == {0: {"n": 1, "a": {}, "c": {}}}


def _copy(c: CarrierConfig) -> CarrierConfig:
    return CarrierConfig(c.name, tps=c.tps, queue_size=c.queue_size, sessions=c.sessions)


def test_webhook_concurrency_per_endpoint_is_a_total() -> None:
    from router.app import webhook_shares
    from router.dlr.webhooks import PER_ACCOUNT, PER_HOST

    assert webhook_shares(1) == (PER_ACCOUNT, PER_HOST)
    assert webhook_shares(2) == (PER_ACCOUNT // 2, PER_HOST // 2)
    assert webhook_shares(64) == (1, 1)  # each worker needs one


def test_workers_setting() -> None:
    assert parse_config({}, env={}).workers == 1
    assert parse_config({"listen": {"workers": 3}}, env={}).workers == 3
    assert parse_config({"listen": {"workers": 3}}, env={"ROUTER_WORKERS": "2"}).workers == 2
    for bad in (0, 65, "2"):
        with pytest.raises(ConfigError, match="workers"):
            parse_config({"listen": {"workers": bad}}, env={})
    with pytest.raises(ConfigError, match="ROUTER_WORKERS"):
        parse_config({}, env={"ROUTER_WORKERS": "two"})
    # Receipts between workers need the durable mode's tables.
    with pytest.raises(ConfigError, match="at-least-once"):
        parse_config({"listen": {"workers": 2}, "delivery": {"guarantee": "in-memory"}}, env={})
    assert parse_config({"delivery": {"guarantee": "in-memory"}}, env={}).workers == 1


def test_merged_metrics_keep_each_worker_apart() -> None:
    a = (
        "# HELP smsrouter_x_total Things.\n# TYPE smsrouter_x_total counter\n"
        'smsrouter_x_total{account="a"} 3.0\n'
        "# HELP smsrouter_g A gauge.\n# TYPE smsrouter_g gauge\nsmsrouter_g 1.0\n"
    )
    b = (
        "# HELP smsrouter_x_total Things.\n# TYPE smsrouter_x_total counter\n"
        'smsrouter_x_total{account="a"} 4.0\n'
    )
    text = merge_expositions({"0": a, "1": b}).decode()
    got = parse_metrics(text)
    assert got['smsrouter_x_total{worker="0",account="a"}'] == 3.0
    assert got['smsrouter_x_total{worker="1",account="a"}'] == 4.0
    assert got['smsrouter_g{worker="0"}'] == 1.0
    assert text.count("# TYPE smsrouter_x_total counter") == 1


def test_merge_round_trips_real_expositions() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    def exposition(n: int) -> str:
        reg = CollectorRegistry()
        Counter("smsrouter_c", "C.", ["account"], registry=reg).labels('we"ird}, a=b').inc(n)
        Histogram("smsrouter_h", "H.", registry=reg).observe(0.01 * n)
        return generate_latest(reg).decode()

    text = merge_expositions({"0": exposition(1), "1": exposition(2)}).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    c = {s.labels["worker"]: s for s in fams["smsrouter_c"].samples}
    assert c["0"].value == 1.0 and c["1"].value == 2.0
    assert c["1"].labels["account"] == 'we"ird}, a=b'
    buckets = [s for s in fams["smsrouter_h"].samples if s.name == "smsrouter_h_bucket"]
    assert {s.labels["worker"] for s in buckets} == {"0", "1"}
    assert text.count("# TYPE smsrouter_h histogram") == 1


def test_a_draining_worker_takes_no_sibling_receipt() -> None:
    """Once a worker drains, its receipt sinks stop: a receipt a sibling got
    for one of its messages must go the database way, not into it."""
    from router.workers import SupervisorLink

    class Sender:  # the engine's side of the exchange: a message it sent
        def __init__(self) -> None:
            self.took: list[str] = []

        def take_sibling_receipt(self, carrier: str, receipt: object) -> bool:
            self.took.append(carrier)
            return True

    async def run() -> list[dict[str, object]]:
        ours, theirs = socket.socketpair()
        link = SupervisorLink(ours.detach())
        await link.open(lambda: None)
        sender = Sender()
        link.engine = sender  # type: ignore[assignment]
        reader, writer = await asyncio.open_unix_connection(sock=theirs)
        answers = []
        for draining in (False, True):
            if draining:
                link.draining()
                assert json.loads(await reader.readline()) == {"op": "draining"}
            offer = {"op": "receipts", "from": 1, "gen": 0, "items": [[7, "sim", "ab12", 2, "000"]]}
            writer.write(json.dumps(offer).encode() + b"\n")
            answers.append(json.loads(await reader.readline()))
        assert sender.took == ["sim"]  # only before draining
        writer.close()
        await link.close()
        return answers

    before, after = asyncio.run(run())
    assert before["items"] == [[7, True]] and after["items"] == [[7, False]]


async def test_shares_sent_while_the_worker_starts_apply_once_it_is_up() -> None:
    """The supervisor rebalances as it spawns a worker, before that worker's
    router exists: the plan is kept and applied when the router attaches,
    not dropped (the supervisor sends it only once while it is unchanged)."""
    from router.workers import SupervisorLink

    ours, theirs = socket.socketpair()
    link = SupervisorLink(ours.detach())
    lost: list[bool] = []
    await link.open(lambda: lost.append(True))
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    plan = {"op": "shares", "n": 2, "a": {"7": 0.02}, "c": {"sim": 0.02}}
    writer.write(json.dumps(plan).encode() + b"\n")
    await writer.drain()
    await asyncio.sleep(0.05)

    class Engine:
        offer_receipt = None
        carriers: dict[str, object] = {}

    class Router:
        applied: list[tuple[int, dict[str, float], dict[str, float]]] = []

        def apply_shares(self, n: int, a: dict[str, float], c: dict[str, float]) -> None:
            self.applied.append((n, a, c))

        def rate_demand(self, elapsed: float) -> dict[str, list[list[object]]]:
            return {"a": [[7, 3.0, 40.0]], "c": []}

    router = Router()
    link.attach(Engine(), router)  # type: ignore[arg-type]
    assert router.applied == [(2, {"7": 0.02}, {"sim": 0.02})]
    # And its demand goes to the supervisor every second.
    line = await asyncio.wait_for(reader.readline(), 3)
    assert json.loads(line) == {"op": "demand", "a": [[7, 3.0, 40.0]], "c": []}
    await link.close()
    writer.close()
    assert not lost


async def test_control_link_carries_big_batches() -> None:
    """One loop turn may relay thousands of submit_sm: the batch is cut into
    lines of at most BATCH items, and a long line (here 1 MB) is read whole
    (asyncio's default 64 KiB limit made the supervisor drop the worker)."""
    from router.workers import BATCH, SupervisorLink

    ours, theirs = socket.socketpair()
    link = SupervisorLink(ours.detach())
    lost: list[bool] = []
    await link.open(lambda: lost.append(True))
    reader, writer = await asyncio.open_unix_connection(sock=theirs, limit=16 * 1024 * 1024)
    for rid in range(1, 1001):
        link._relay_send(rid, "sim", b"\x00" * 300)
    await asyncio.sleep(0.05)
    sizes = []
    while sum(sizes) < 1000:
        msg = json.loads(await asyncio.wait_for(reader.readline(), 3))
        assert msg["op"] == "relay"
        sizes.append(len(msg["items"]))
    assert max(sizes) <= BATCH and sum(sizes) == 1000
    # The worker reads a 1 MB line (answers for a carrier it has no relay
    # of are ignored) and stays linked.
    items = [[rid, "other", "A" * 1000] for rid in range(1000)]
    writer.write(json.dumps({"op": "relay_result", "items": items}).encode() + b"\n")
    plan = {"op": "shares", "n": 2, "a": {}, "c": {}}
    writer.write(json.dumps(plan).encode() + b"\n")
    await asyncio.wait_for(writer.drain(), 5)  # a reader that gave up would block this
    await asyncio.sleep(0.1)
    assert link._shares == plan and not lost  # it read on past the long line
    await link.close()
    writer.close()


async def test_relays_in_flight_to_a_worker_that_dies_are_answered_at_once() -> None:
    """Relayed submits go round robin to the siblings bound to the carrier;
    when one of them exits, its senders hear 'no answer' for what it had
    in flight right away (and resend), not after their timeout."""
    from router.workers import Supervisor

    sup = Supervisor(Config(), 3, config_path=None, demo=False, env={})
    readers, keep = [], []
    for w in sup.workers:
        ours, theirs = socket.socketpair()
        reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
        our_reader, w.writer = await asyncio.open_unix_connection(sock=ours)
        readers.append(reader)
        keep += [their_writer, our_reader]  # a collected end would close the pair
        w.ready.set()
    sup.workers[1].bound = sup.workers[2].bound = {"sim"}
    sup._route_relays(sup.workers[0], [[rid, "sim", "AAAA"] for rid in range(1, 7)])
    sup._route_relays(sup.workers[0], [[7, "nobody-binds-this", "AAAA"]])

    async def line(i: int) -> dict[str, object]:
        return json.loads(await asyncio.wait_for(readers[i].readline(), 3))  # type: ignore[no-any-return]

    to1, to2 = await line(1), await line(2)
    got1 = [item[0] for item in to1["items"]]  # type: ignore[union-attr]
    got2 = [item[0] for item in to2["items"]]  # type: ignore[union-attr]
    assert sorted(got1 + got2) == [1, 2, 3, 4, 5, 6] and got1 and got2
    assert await line(0) == {"op": "relay_result", "items": [[7, "nobody-binds-this", None]]}
    # Worker 2 answers one of its own; then worker 1 dies.
    sup._relay_answered(sup.workers[2], 0, 0, [[got2[0], "sim", "BBBB"]])
    assert (await line(0))["items"] == [[got2[0], "sim", "BBBB"]]
    sup._forget_relays(sup.workers[1])
    answered = await line(0)
    assert sorted(i[0] for i in answered["items"]) == sorted(got1)  # type: ignore[union-attr]
    assert all(i[2] is None for i in answered["items"])  # type: ignore[union-attr]
    assert set(sup._relaying.get(2, {})) == {(0, 0, rid) for rid in got2[1:]}
    for w in sup.workers:
        assert w.writer is not None
        w.writer.close()
    del keep


def test_hold_port_refuses_a_port_another_router_listens_on() -> None:
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen()
    try:
        with pytest.raises(OSError):
            hold_port("127.0.0.1", other.getsockname()[1])
    finally:
        other.close()


def test_held_port_is_shared_by_reuseport_listeners() -> None:
    held, port = hold_port("127.0.0.1", 0)
    listeners = []
    try:
        assert port > 0
        for _ in range(2):  # what two workers do
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
            listeners.append(s)
    finally:
        for s in listeners:
            s.close()
        held.close()


# ----------------------------------------------------------- the process tree


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def metrics_of(http: aiohttp.ClientSession, ops: int) -> dict[str, float]:
    async with http.get(f"http://127.0.0.1:{ops}/metrics") as r:
        assert r.status == 200
        return parse_metrics(await r.text())


def total(m: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in m.items() if k.split("{", 1)[0] == name and all(w in k for w in want))


async def wait_for(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def both_workers_ready(http: aiohttp.ClientSession, ops: int) -> None:
    async def ready() -> bool:
        async with http.get(f"http://127.0.0.1:{ops}/readyz") as r:
            return r.status == 200 and (await r.json())["workers_ok"] == 2

    await wait_for(ready, 30, "both workers ready")


async def binds_on_both_workers(
    http: aiohttp.ClientSession, ports: dict[str, int], at_least: int
) -> list[Esme]:
    """At least ``at_least`` binds of acme, more until each worker holds
    one (the kernel spreads connections; 40 at most)."""
    esmes: list[Esme] = []
    binds = [0.0, 0.0]
    for _ in range(40):
        esme, resp = await connect(ports["smpp"])
        assert resp.status == Status.ESME_ROK
        esmes.append(esme)
        if len(esmes) >= at_least:
            m = await metrics_of(http, ports["ops"])
            binds = [total(m, "smsrouter_smpp_binds", worker=str(i)) for i in (0, 1)]
            if min(binds) > 0:
                return esmes
    raise AssertionError(f"binds not spread over both workers: {binds}")


async def stop_all(
    esmes: list[Esme], proc: subprocess.Popen[bytes], sim: CarrierSimulator, log: Path
) -> None:
    """Close the customers, SIGTERM the router (it must exit 0), stop the carrier."""
    for e in esmes:
        e.close()
    code = stop_router(proc, timeout=40)
    await sim.stop()
    assert code == 0, log.read_text()[-3000:]


async def two_workers_on_a_simulator(
    tmp_path: Path, sim_config: SimConfig | None = None, **carrier: object
) -> tuple[CarrierSimulator, dict[str, int], Path, Path]:
    """A carrier simulator and a config of two workers routing to it."""
    sim = CarrierSimulator(sim_config or SimConfig(port=0, name="sim"))
    sim_port = await sim.start()
    ports = free_ports()
    cfg = tmp_path / "router.toml"
    cfg.write_text(
        listen_toml(ports)
        + "workers = 2\n"
        + carrier_toml("sim", sim_port, **carrier)
        + '[routes]\ndefault = ["sim"]\n'
    )
    return sim, ports, cfg, tmp_path / "router.log"


async def test_two_workers_share_ports_binds_receipts_and_restarts(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    acme = await create_account(db, "acme", system_id="acme", password="acme-pw1", max_binds=12)
    _, key = await add_api_key(db, acme)
    sim, ports, cfg, log = await two_workers_on_a_simulator(
        tmp_path, SimConfig(port=0, name="sim", dlr_delay=0.05), tps=2000.0, window=32, sessions=2
    )
    proc = await start_router(cfg, database_url, ports["ops"], log, timeout=60)
    esmes: list[Esme] = []
    workers: list[int] = []
    try:
        workers = children_of(proc.pid)
        assert len(workers) == 2, log.read_text()[-2000:]
        async with aiohttp.ClientSession() as http:
            # Ready as soon as one worker is (start_router waited for that).
            await both_workers_ready(http, ports["ops"])
            async with http.get(f"http://127.0.0.1:{ports['ops']}/readyz") as r:
                body = await r.json()
            assert r.status == 200 and body["ready"] is True
            assert (body["workers_ok"], body["workers_configured"]) == (2, 2)
            assert sorted(body["workers"]) == ["0", "1"]
            assert all(w["ready"] for w in body["workers"].values())
            # Both workers bound to the carrier: 2 sessions = one each.
            m = await metrics_of(http, ports["ops"])
            assert total(m, "smsrouter_workers", state="running") == 2
            assert total(m, "smsrouter_carrier_binds", worker="0") == 1
            assert total(m, "smsrouter_carrier_binds", worker="1") == 1

            # max_binds counts across the workers: 12 binds, the 13th refused.
            for _ in range(12):
                esme, resp = await connect(ports["smpp"])
                assert resp.status == Status.ESME_ROK
                esmes.append(esme)
            extra, resp = await connect(ports["smpp"])
            assert resp.status == Status.ESME_RBINDFAIL
            extra.close()
            m = await metrics_of(http, ports["ops"])
            per_worker = [total(m, "smsrouter_smpp_binds", worker=str(i)) for i in (0, 1)]
            assert sum(per_worker) == 12
            # The kernel spread the connections (all 12 on one: p = 2/4096).
            assert min(per_worker) > 0, per_worker
            # A bind that ends gives its slot back, whichever worker held it.
            await esmes.pop().unbind()
            await asyncio.sleep(0.2)
            again, resp = await connect(ports["smpp"])
            assert resp.status == Status.ESME_ROK
            esmes.append(again)

            # Every bind submits; each receipt reaches a bind of the account (any
            # of them, on either worker) although the carrier returns it over
            # either worker's session.
            ids: dict[str, Esme] = {}
            for n, esme in enumerate(esmes):
                for i in range(5):
                    r = await esme.submit("+4512345678", f"w-{n}-{i}")
                    assert r.status == Status.ESME_ROK
                    ids[r.message_id] = esme  # type: ignore[attr-defined]

            async def receipts_in() -> bool:
                got = set().union(*(e.receipts for e in esmes))
                return set(ids) <= got

            await wait_for(receipts_in, 30, "receipts for every SMPP message")
            # HTTP on the shared port, a new connection per request.
            http_ids = []
            for _ in range(8):
                async with aiohttp.ClientSession() as one:  # a new connection each
                    async with one.post(
                        f"http://127.0.0.1:{ports['http']}/v1/messages",
                        json={"to": "+4512345678", "from": "Acme", "text": "over http"},
                        headers={"Authorization": f"Bearer {key}"},
                    ) as r:
                        assert r.status == 202, await r.text()
                        http_ids.append((await r.json())["id"])

            async def http_delivered() -> bool:
                # Any worker answers for any message (the status lives in PostgreSQL).
                for mid in http_ids:
                    async with http.get(
                        f"http://127.0.0.1:{ports['http']}/v1/messages/{mid}",
                        headers={"Authorization": f"Bearer {key}"},
                    ) as r:
                        if r.status != 200 or (await r.json())["status"] != "delivered":
                            return False
                return True

            await wait_for(http_delivered, 30, "HTTP messages delivered")
            m = await metrics_of(http, ports["ops"])
            accepted = [
                total(m, "smsrouter_messages_accepted_total", worker=str(i)) for i in (0, 1)
            ]
            assert sum(accepted) == len(ids) + len(http_ids)
            # The carrier sent receipts over both workers' sessions: those that
            # reached the worker that did not send the message were taken by
            # its sibling in memory (none needed the database path here).
            taken = total(m, "smsrouter_worker_receipts_total", outcome="taken")
            assert taken > 0
            assert total(m, "smsrouter_carrier_receipts_forwarded_total") == 0

            # kill -9 one worker: the supervisor starts it again, same node id.
            victim = workers[0]
            os.kill(victim, signal.SIGKILL)
            # The host stays ready on the other worker meanwhile (its listeners
            # take every new connection), with the missing one shown.
            while alive(victim):
                await asyncio.sleep(0.01)
            async with http.get(f"http://127.0.0.1:{ports['ops']}/readyz") as r:
                body = await r.json()
                assert r.status == 200 and body["workers_ok"] == 1, body

            async def replaced() -> bool:
                now = children_of(proc.pid)
                if len(now) != 2 or victim in now:
                    return False
                async with http.get(f"http://127.0.0.1:{ports['ops']}/readyz") as r:
                    return r.status == 200

            await wait_for(replaced, 60, "the killed worker to be replaced and ready")
            m = await metrics_of(http, ports["ops"])
            assert total(m, "smsrouter_worker_restarts_total") == 1
            workers = children_of(proc.pid)
    finally:
        await stop_all(esmes, proc, sim, log)
    for pid in workers:
        assert not alive(pid), f"worker {pid} outlived its supervisor's SIGTERM"
    # One signing key for all the workers, made by the supervisor.
    assert log.read_text().count('"webhook_signing_key_generated"') == 1


async def test_rates_follow_the_traffic_to_the_worker_that_has_it(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """One bind lands on one worker. Its account's tps and the carrier's tps
    are totals for the router: the supervisor moves them to the worker that
    has the traffic (router/shares.py), where a fixed split would give it
    half. The router as a whole never goes above either total."""
    acme = await create_account(db, "acme", system_id="acme", password="acme-pw1")
    await db.execute("UPDATE accounts SET tps = 40 WHERE id = $1", acme)
    await create_account(db, "bulk", system_id="bulk", password="bulk-pw1")
    sim, ports, cfg, log = await two_workers_on_a_simulator(
        tmp_path, SimConfig(port=0, name="sim", dlr_delay=0.05), tps=60.0, window=32, sessions=2
    )
    proc = await start_router(cfg, database_url, ports["ops"], log, timeout=60)
    esmes: list[Esme] = []
    try:
        async with aiohttp.ClientSession() as http:
            await both_workers_ready(http, ports["ops"])
            # The account: 100 submit_sm/s offered over one bind for 7 s.
            esme, resp = await connect(ports["smpp"])
            assert resp.status == Status.ESME_ROK
            esmes.append(esme)
            start = time.monotonic()
            answers: list[tuple[float, int]] = []
            for i in range(700):
                r = await esme.submit("+4512345678", f"a-{i}")
                answers.append((time.monotonic() - start, r.status))
                pause = start + (i + 1) / 100 - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
            codes = {code for _, code in answers}
            assert codes <= {Status.ESME_ROK, Status.ESME_RTHROTTLED}, codes
            # After the first rebalances (<= 2 s): close to 40/s, where a
            # fixed half would be 20/s.
            late = [t for t, code in answers if code == Status.ESME_ROK and t >= 3.0]
            span = answers[-1][0] - 3.0
            assert 32 * span <= len(late) <= 40 * span + 8, (len(late), span)
            ok = sum(1 for _, code in answers if code == Status.ESME_ROK)
            assert ok <= 40 * answers[-1][0] + 2 * 4 + 20, ok  # bursts + one 1/N second
            await wait_for(
                lambda: _async_true(sim.received_count() >= ok), 30, "the account's messages sent"
            )
            # The carrier: 360 messages queued on one worker drain at close to
            # the carrier's 60/s, not at a fixed half of it.
            bulk, resp = await connect(ports["smpp"], "bulk", "bulk-pw1")
            assert resp.status == Status.ESME_ROK
            esmes.append(bulk)
            base = sim.received_count()
            sends = [bulk.submit("+4512345678", f"b-{i}") for i in range(360)]
            results = await asyncio.gather(*sends)
            assert all(r.status == Status.ESME_ROK for r in results)
            marks: dict[int, float] = {}
            deadline = time.monotonic() + 30
            while len(marks) < 2 and time.monotonic() < deadline:
                got = sim.received_count() - base
                for mark in (120, 300):
                    if got >= mark and mark not in marks:
                        marks[mark] = time.monotonic()
                        if mark == 120:  # the backlog's worker holds nearly all of it
                            m = await metrics_of(http, ports["ops"])
                            limits = [
                                total(m, "smsrouter_carrier_rate_limit", worker=str(i))
                                for i in (0, 1)
                            ]
                await asyncio.sleep(0.01)
            assert len(marks) == 2, sim.received_count() - base
            rate = 180 / (marks[300] - marks[120])
            assert 48 <= rate <= 60 * 1.1, rate
            assert max(limits) >= 0.9 * 60 and sum(limits) <= 60.0 + 1e-3, limits
    finally:
        await stop_all(esmes, proc, sim, log)


async def _async_true(value: bool) -> bool:
    return value


async def test_a_carrier_with_one_bind_serves_every_worker(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """The carrier allows one bind (the simulator answers ESME_RALYBND to a
    second): one worker binds it, the other sends through that bind
    (router/carriers/relay.py). Customers on either worker get their
    messages sent and their receipts; when the binding worker is killed and
    started again, the relaying worker's messages flow again."""
    await create_account(db, "acme", system_id="acme", password="acme-pw1", max_binds=40)
    sim, ports, cfg, log = await two_workers_on_a_simulator(
        tmp_path,
        # A slow carrier and a small window: both workers' traffic competes
        # for the one bind's window (relayed submits go ahead of the binding
        # worker's own queue, none waits until it is given up).
        SimConfig(port=0, name="sim", dlr_delay=0.05, max_binds=1, latency=0.02),
        tps=2000.0,
        window=4,
        sessions=1,
    )
    proc = await start_router(cfg, database_url, ports["ops"], log, timeout=60)
    esmes: list[Esme] = []
    try:
        async with aiohttp.ClientSession() as http:
            await both_workers_ready(http, ports["ops"])
            esmes += await binds_on_both_workers(http, ports, at_least=4)

            async def send_all(tag: str) -> dict[str, Esme]:
                # Every bind at once, 10 messages each in flight together.
                sent = [
                    (esme, esme.submit("+4512345678", f"{tag}-{n}-{i}"))
                    for n, esme in enumerate(esmes)
                    for i in range(10)
                ]
                answers = await asyncio.gather(*(s for _, s in sent))
                assert all(r.status == Status.ESME_ROK for r in answers)
                return {r.message_id: e for (e, _), r in zip(sent, answers, strict=True)}  # type: ignore[attr-defined]

            async def receipts_for(ids: dict[str, Esme]) -> None:
                async def arrived() -> bool:
                    return set(ids) <= set().union(*(e.receipts for e in esmes))

                await wait_for(arrived, 30, "a receipt for every message")

            ids = await send_all("one")
            await receipts_for(ids)
            assert sim.bound_count() == 1
            m = await metrics_of(http, ports["ops"])
            assert total(m, "smsrouter_carrier_binds", worker="0") == 1  # its own
            assert total(m, "smsrouter_carrier_binds", worker="1") == 1  # the relay
            relayed = total(m, "smsrouter_worker_relayed_total", outcome="answered")
            assert relayed > 0
            # Every message reached the carrier once (no resend was needed).
            texts = [r.payload.decode() for r in sim.received]
            assert len(texts) == len(set(texts)) == len(ids)

            # kill -9 the worker holding the bind: it is started again, binds
            # again, and the other worker's messages go through it again.
            workers = children_of(proc.pid)
            binder = workers[0] if len(workers) == 2 else None
            assert binder is not None
            os.kill(binder, signal.SIGKILL)
            while alive(binder):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # its customers' connections are reset
            survivors = [e for e in esmes if e.is_open]
            assert survivors  # the relaying worker's customers stay bound
            esmes[:] = survivors

            async def rebound() -> bool:
                m = await metrics_of(http, ports["ops"])
                return (
                    total(m, "smsrouter_carrier_binds", worker="1") == 1
                    and total(m, "smsrouter_carrier_binds", worker="0") == 1
                )

            await wait_for(rebound, 60, "the carrier bound again and relayed")
            ids = await send_all("two")
            await receipts_for(ids)
            assert sim.bound_count() == 1
            texts = [r.payload.decode() for r in sim.received if r.payload.startswith(b"two-")]
            assert set(texts) == {f"two-{n}-{i}" for n in range(len(esmes)) for i in range(10)}

            # A reload that raises the carrier's sessions: sessions change at
            # the next restart, so the relay stays (the carrier must not go
            # down on the relaying worker meanwhile).
            cfg.write_text(cfg.read_text().replace("sessions = 1", "sessions = 2"))
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(2.5)  # reloaded, and a bound report and rebalance later
            assert log.read_text().count('"carriers_reloaded"') == 2  # both workers
            ids = await send_all("three")
            await receipts_for(ids)
            m = await metrics_of(http, ports["ops"])
            assert total(m, "smsrouter_carrier_binds", worker="1") == 1
            assert sim.bound_count() == 1
    finally:
        await stop_all(esmes, proc, sim, log)
    assert "ESME_RALYBND" not in log.read_text()  # nobody asked for a second bind


async def test_sighup_while_workers_start_kills_none(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """A reload (systemctl reload: SIGHUP to the main process) while the
    workers start: SIGHUP's default action would end a worker that has not
    taken it over yet, so the supervisor passes it on to ready ones only."""
    sim, ports, cfg, log = await two_workers_on_a_simulator(tmp_path)
    proc = spawn_router(cfg, database_url, log)
    try:
        deadline = time.monotonic() + 30
        while not children_of(proc.pid) and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            await asyncio.sleep(0.01)  # the supervisor is up: it spawns workers
        hups = 0
        ready = False
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline and not ready:
                assert proc.poll() is None, log.read_text()[-3000:]
                proc.send_signal(signal.SIGHUP)
                hups += 1
                try:
                    async with http.get(f"http://127.0.0.1:{ports['ops']}/readyz") as r:
                        body = await r.json()
                        ready = r.status == 200 and body["workers_ok"] == 2
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            assert ready, log.read_text()[-3000:]
            assert hups >= 5  # the workers took a while to start: signals came meanwhile
            m = await metrics_of(http, ports["ops"])
            assert total(m, "smsrouter_worker_restarts_total") == 0
            assert "worker_exited" not in log.read_text()
    finally:
        code = stop_router(proc, timeout=40)
        await sim.stop()
    assert code == 0, log.read_text()[-3000:]


async def test_workers_leave_when_the_supervisor_dies(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    sim, ports, cfg, log = await two_workers_on_a_simulator(tmp_path)
    proc = await start_router(cfg, database_url, ports["ops"], log, timeout=60)
    workers = children_of(proc.pid)
    try:
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(alive(p) for p in workers), "a worker outlived its supervisor"
        assert "supervisor_lost" in log.read_text()
    finally:
        for p in workers:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        stop_router(proc)
        await sim.stop()


def test_workers_flag_is_checked(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "router.cli", "run", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, ROUTER_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none"),
    )
    assert res.returncode != 0
    assert "--workers: 1..64" in res.stderr


async def test_kill_9_of_a_worker_under_load_loses_no_acknowledged_message(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """At-least-once with workers: kill -9 one worker while both have a
    backlog for a slow carrier; the supervisor starts it again with its node
    id, it resends its own spool, and every message that got a positive
    submit_sm_resp on either worker reaches the carrier."""
    await create_account(db, "acme", system_id="acme", password="acme-pw1", max_binds=40)
    sim, ports, cfg, log = await two_workers_on_a_simulator(
        tmp_path, SimConfig(port=0, name="sim", dlr_delay=0.2, latency=0.01), tps=300.0, window=32
    )
    proc = await start_router(cfg, database_url, ports["ops"], log, timeout=60)
    acked: dict[str, str] = {}  # text -> our id
    esmes: list[Esme] = []
    try:
        async with aiohttp.ClientSession() as http:
            await both_workers_ready(http, ports["ops"])
            esmes += await binds_on_both_workers(http, ports, at_least=8)

            async def one(i: int) -> None:
                text = f"wcrash-{i:05d}"
                try:
                    r = await esmes[i % len(esmes)].submit("+4512345678", text)
                except (ConnectionError, TimeoutError):
                    return
                if r.status == Status.ESME_ROK:
                    acked[text] = r.message_id  # type: ignore[attr-defined]

            tasks = [asyncio.create_task(one(i)) for i in range(1600)]
            deadline = time.monotonic() + 30
            while len(acked) < 700 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            received_before = sim.received_count()
            victim = children_of(proc.pid)[0]
            os.kill(victim, signal.SIGKILL)
            await asyncio.gather(*tasks, return_exceptions=True)
            assert len(acked) >= 700, "load did not reach the kill point"
            assert received_before < len(acked), "nothing was in flight at the kill"

            missing, _ = await carrier_got_all(
                sim, set(acked), len(acked), received_before, timeout=90
            )
            assert not missing, f"{len(missing)} acknowledged messages never reached the carrier"
            m = await metrics_of(http, ports["ops"])
            assert total(m, "smsrouter_worker_restarts_total") == 1
            # The worker started again under its node id resent its own backlog
            # (not its sibling after node_grace).
            assert '"event": "spool_replayed"' in log.read_text()
    finally:
        for e in esmes:
            e.close()
        stop_router(proc, timeout=40)
        await sim.stop()
