"""The benchmark HTTP load client (benchmarks/http_load.py) against scripted
loopback servers: responses split byte by byte, extra bytes, odd headers,
chunked or malformed answers, closes and timeouts. The HTTP figures in the
README are only as honest as this client's counting."""

import asyncio

import pytest
import uvloop

from benchmarks import http_load as hl


class Script(asyncio.Protocol):
    """Server: for each request, pops a list of (delay, bytes|'close') steps."""

    scripts: list = []
    conns = 0
    requests: list = []

    def connection_made(self, t):
        Script.conns += 1
        self.t = t
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            n = int(
                [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][
                    0
                ].split(b":")[1]
            )
            if len(rest) < n:
                return
            Script.requests.append(head + b"\r\n\r\n" + rest[:n])
            self.buf = rest[n:]
            asyncio.ensure_future(self.play(Script.scripts.pop(0)))

    async def play(self, steps):
        for delay, what in steps:
            await asyncio.sleep(delay)
            if what == "close":
                self.t.close()
                return
            self.t.write(what)


def ok(body=b'{"accepted": 3}', extra=b""):
    return b"HTTP/1.1 202 Accepted\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def run(coro):
    return uvloop.run(coro)


async def server():
    Script.conns = 0
    Script.requests = []
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(Script, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


def pool(port):
    return hl.Pool(
        f"http://127.0.0.1:{port}", hl.encode_request(f"http://127.0.0.1:{port}", "k", b'{"a":1}')
    )


def test_request_bytes():
    r = hl.encode_request("http://127.0.0.1:8080", "demo-key", b'{"x": 1}')
    assert r == (
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: Bearer demo-key\r\n"
        b'Content-Type: application/json\r\nContent-Length: 8\r\n\r\n{"x": 1}'
    )


def test_split_bytewise_and_reuse():
    async def main():
        srv, port = await server()
        resp = ok()
        Script.scripts = [
            [(0.001, resp[i : i + 1]) for i in range(len(resp))],
            [(0, resp)],
            [(0, resp[:30]), (0.01, resp[30:])],
        ]
        p = pool(port)
        out = [await p.post() for _ in range(3)]
        assert out == [(202, b'{"accepted": 3}')] * 3
        assert Script.conns == 1
        assert Script.requests[0].endswith(b'{"a":1}')
        p.close()
        srv.close()

    run(main())


def test_case_insensitive_and_429():
    async def main():
        srv, port = await server()
        Script.scripts = [[(0, b"HTTP/1.1 429 Too Many\r\ncontent-LENGTH:  2 \r\nX: y\r\n\r\n{}")]]
        p = pool(port)
        assert await p.post() == (429, b"{}")
        p.close()
        srv.close()

    run(main())


def test_direct_feed_pieces_and_extra_bytes():
    async def main():
        c = hl.Connection()

        class T:
            aborted = closed = False

            def write(self, d):
                pass

            def abort(self):
                self.aborted = True

            def close(self):
                self.closed = True

        t = T()
        c.connection_made(t)
        f = c.send(b"x")
        c.data_received(b"HTTP/1.1 202 OK\r\nContent-Le")
        c.data_received(b"ngth: 5\r\n\r")
        assert not f.done()
        c.data_received(b"\nhel")
        assert not f.done()
        c.data_received(b"lo")
        assert f.result() == (202, b"hello")
        f = c.send(b"x")
        c.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert f.result() == (200, b"")
        # an unsolicited second response in the same piece: error, connection dropped
        f = c.send(b"x")
        c.data_received(ok() + ok())
        assert f.result() == (202, b'{"accepted": 3}')
        assert t.aborted and c.closed

    run(main())


@pytest.mark.parametrize(
    "resp,exc",
    [
        (
            b"HTTP/1.1 202 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            hl.BadResponse,
        ),
        (b"HTTP/1.1 202 OK\r\n\r\nhello", hl.BadResponse),
        (b"garbage\r\n\r\n", hl.BadResponse),
        (b"HTTP/1.1 202 OK\r\nContent-Length: -1\r\n\r\n", hl.BadResponse),
    ],
)
def test_unreadable_then_reconnect(resp, exc):
    async def main():
        srv, port = await server()
        Script.scripts = [[(0, resp)], [(0, ok())]]
        p = pool(port)
        with pytest.raises(exc):
            await p.post()
        assert await p.post() == (202, b'{"accepted": 3}')
        assert Script.conns == 2
        p.close()
        srv.close()

    run(main())


def test_connection_close_header():
    async def main():
        srv, port = await server()
        Script.scripts = [[(0, ok(extra=b"Connection: close\r\n"))], [(0, ok())]]
        p = pool(port)
        assert (await p.post())[0] == 202
        assert (await p.post())[0] == 202
        assert Script.conns == 2
        p.close()
        srv.close()

    run(main())


def test_server_closes_mid_response_and_idle():
    async def main():
        srv, port = await server()
        Script.scripts = [
            [(0, ok()[:20]), (0.01, "close")],
            [(0, ok()), (0.01, "close")],
            [(0, ok())],
        ]
        p = pool(port)
        with pytest.raises(hl.ConnectionClosed):
            await p.post()
        assert (await p.post())[0] == 202
        await asyncio.sleep(0.05)  # idle connection closed by the server meanwhile
        assert (await p.post())[0] == 202
        assert Script.conns == 3
        p.close()
        srv.close()

    run(main())


def test_timeout_and_refused(monkeypatch):
    monkeypatch.setattr(hl, "REQUEST_TIMEOUT", 0.1)

    async def main():
        srv, port = await server()
        Script.scripts = [[(0.5, ok())], [(0, ok())]]
        p = pool(port)
        with pytest.raises(TimeoutError):
            await p.post()
        assert (await p.post())[0] == 202
        p.close()
        srv.close()
        await srv.wait_closed()
        with pytest.raises(ConnectionRefusedError):
            await pool(port).post()

    run(main())


def test_generator_counts_failures(monkeypatch, tmp_path):
    async def main():
        srv, port = await server()
        Script.scripts = [
            [(0, ok(b'{"accepted": 7}'))],
            [(0, ok(b'{"nope": 1}'))],
            [(0, b"HTTP/1.1 202 OK\r\nTransfer-Encoding: chunked\r\n\r\n")],
            [(0, ok())],
        ]
        args = hl.parse_args(
            ["--url", f"http://127.0.0.1:{port}", "--batch", "7", "--output", str(tmp_path / "x")]
        )
        g = hl.HttpGenerator(args)
        for _ in range(4):
            await g.one(hl.clock())
        assert g.statuses == {"202": 2, "client:KeyError": 1, "client:BadResponse": 1}
        assert g.series.buckets["accepted"] == [10]
        g.pool.close()
        srv.close()

    run(main())
