"""The parameter server's transport, measured: one pull-sized round trip (a small request, a reply of D float32)
and one push-sized round trip (D float32 up, a small reply) over loopback, with ZeroMQ (pyzmq DEALER/ROUTER,
what sparkml_dist.ps uses) and with HTTP/1.1 keep-alive (the standard library's ThreadingHTTPServer and
http.client, TCP_NODELAY on both ends: the "plain HTTP" alternative), at D = 33 (the default problem's
model), 65k and 1M.

    .venv/bin/python bench/ps_transport.py [--sizes 33 65536 1048576] [--seconds 2]

torch.distributed.rpc is not measured: it needs every participant in init_rpc with a fixed world size (a
gang), which is what a non-barrier, resubmittable worker cannot promise. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import zmq

HOST = "127.0.0.1"


def _zmq_server(ctx: zmq.Context, payloads: dict[int, bytes]) -> tuple[int, threading.Thread]:
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port(f"tcp://{HOST}")

    def loop() -> None:
        while True:
            ident, head, *body = sock.recv_multipart()
            if head == b"stop":
                sock.send_multipart([ident, b"ok"])
                break
            op, n = head.split(b":")
            sock.send_multipart([ident, b"ok", payloads[int(n)]] if op == b"pull" else [ident, b"ok"])
        sock.close(linger=0)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return port, t


def _time(fn, seconds: float) -> float:
    fn()  # warm
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def bench_zmq(sizes: list[int], seconds: float) -> dict:
    ctx = zmq.Context()
    payloads = {n: np.zeros(n, np.float32).tobytes() for n in sizes}
    port, t = _zmq_server(ctx, payloads)
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://{HOST}:{port}")
    out = {}
    for n in sizes:

        def pull(n: int = n) -> None:
            sock.send_multipart([f"pull:{n}".encode()])
            sock.recv_multipart()

        def push(n: int = n) -> None:
            sock.send_multipart([f"push:{n}".encode(), payloads[n]])
            sock.recv_multipart()

        out[str(n)] = {"pull_us": round(_time(pull, seconds), 1), "push_us": round(_time(push, seconds), 1)}
    sock.send_multipart([b"stop"])
    sock.recv_multipart()
    t.join()
    sock.close(linger=0)
    ctx.term()
    return out


def bench_http(sizes: list[int], seconds: float) -> dict:
    payloads = {n: np.zeros(n, np.float32).tobytes() for n in sizes}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else delayed ACKs add ~40 ms per call: not HTTP's fault

        def do_GET(self) -> None:  # noqa: N802
            body = payloads[int(self.path.rsplit("/", 1)[1])]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer((HOST, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = http.client.HTTPConnection(HOST, server.server_address[1])
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = {}
    for n in sizes:

        def pull(n: int = n) -> None:
            conn.request("GET", f"/pull/{n}")
            conn.getresponse().read()

        def push(n: int = n) -> None:
            conn.request("PUT", f"/push/{n}", body=payloads[n])
            conn.getresponse().read()

        out[str(n)] = {"pull_us": round(_time(pull, seconds), 1), "push_us": round(_time(push, seconds), 1)}
    conn.close()
    server.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[33, 65536, 1048576])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    result = {
        "benchmark": "ps_transport",
        "pyzmq": zmq.__version__,
        "zmq_us": bench_zmq(args.sizes, args.seconds),
        "http_keepalive_us": bench_http(args.sizes, args.seconds),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
