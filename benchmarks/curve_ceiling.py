"""What CurveZMQ encryption costs the tcp inline path: 8 MB messages from a
PUSH to a PULL socket in another process over tcp loopback, with and
without CURVE (the bridge's tcp sockets always use CURVE: issue 12), and the
same over ipc. A reference for the ``tcp inline`` rows of
benchmarks/stream.py: no plane path can be faster than its transport.

    .venv/bin/python benchmarks/curve_ceiling.py [--messages 64] [--mb 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import zmq


def _sink(endpoint: str, n: int, server_secret: bytes | None, ready) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    if server_secret is not None:
        s.curve_server = True
        s.curve_secretkey = server_secret
    s.bind(endpoint)
    ready.set()
    for _ in range(n + 1):
        s.recv(copy=False)
    s.close(0)
    ctx.term()


def run(endpoint: str, n: int, nbytes: int, curve: bool) -> float:
    server_public, server_secret = zmq.curve_keypair() if curve else (None, None)
    ready = mp.Event()
    p = mp.Process(target=_sink, args=(endpoint, n, server_secret, ready))
    p.start()
    ready.wait(10)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    if curve:
        s.curve_serverkey = server_public
        s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
    s.connect(endpoint)
    msg = bytes(nbytes)
    s.send(msg)  # the handshake
    t0 = time.perf_counter()
    for _ in range(n):
        s.send(msg, copy=False)
    p.join(120)
    secs = time.perf_counter() - t0
    s.close(0)
    ctx.term()
    return n * nbytes / secs / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=64)
    ap.add_argument("--mb", type=int, default=8)
    a = ap.parse_args()
    nbytes = a.mb << 20
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    rows = [
        ("tcp loopback, CURVE", run(f"tcp://127.0.0.1:{port}", a.messages, nbytes, True)),
        ("tcp loopback, no encryption", run(f"tcp://127.0.0.1:{port + 1}", a.messages, nbytes, False)),
        ("ipc, no encryption", run(f"ipc:///tmp/fjb-curve-ceiling-{port}", a.messages, nbytes, False)),
    ]
    print(f"ZeroMQ transport ceiling: {a.messages} messages of {a.mb} MB, sender and receiver in two processes")
    for name, gbs in rows:
        print(f"{name:32s} {gbs:6.2f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
