"""Measures a link: round-trip time and throughput each way, between a server in one network
namespace and a client in another (`python -m classynet_eval.probe serve|measure`).

Protocol, one TCP connection per measurement; the first byte picks the mode:
  b"E": echo one byte back per byte received (round-trip time);
  b"U": read until the client half-closes, then answer the byte count (8 bytes, big-endian);
  b"D": read an 8-byte count, send that many bytes, close.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import threading
import time

CHUNK = 64 * 1024


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += part
    return buf


def _handle(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = conn.recv(1)
        if mode == b"E":
            while b := conn.recv(1):
                conn.sendall(b)
        elif mode == b"U":
            total = 0
            while part := conn.recv(CHUNK):
                total += len(part)
            conn.sendall(struct.pack(">Q", total))
        elif mode == b"D":
            (n,) = struct.unpack(">Q", _recv_exact(conn, 8))
            block = b"\x5a" * CHUNK
            while n > 0:
                conn.sendall(block[:min(n, CHUNK)])
                n -= min(n, CHUNK)


def serve(listen: str, seconds: float) -> None:
    host, port = listen.rsplit(":", 1)
    srv = socket.create_server((host, int(port)))
    srv.settimeout(0.5)
    print(f"probe listening on {host}:{srv.getsockname()[1]}", flush=True)
    end = time.monotonic() + seconds  # bounded: the probe never outlives its measurement
    while time.monotonic() < end:
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


def _connect(addr: str) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def measure(addr: str, pings: int, nbytes: int) -> dict:
    with _connect(addr) as s:
        s.sendall(b"E")
        rtts = []
        for _ in range(pings):
            t = time.perf_counter()
            s.sendall(b"x")
            _recv_exact(s, 1)
            rtts.append(time.perf_counter() - t)
    with _connect(addr) as s:
        s.sendall(b"U")
        block = b"\xa5" * CHUNK
        t = time.perf_counter()
        left = nbytes
        while left > 0:
            s.sendall(block[:min(left, CHUNK)])
            left -= min(left, CHUNK)
        s.shutdown(socket.SHUT_WR)
        (got,) = struct.unpack(">Q", _recv_exact(s, 8))
        up = time.perf_counter() - t
    with _connect(addr) as s:
        s.sendall(b"D" + struct.pack(">Q", nbytes))
        t = time.perf_counter()
        down_got = 0
        while part := s.recv(CHUNK):
            down_got += len(part)
        down = time.perf_counter() - t
    rtt = statistics.median(rtts)
    # Each transfer's time includes about one round trip of set-up and final answer; leave it out.
    return {
        "rtt_ms_median": 1000 * rtt, "rtt_ms_min": 1000 * min(rtts), "rtt_ms_max": 1000 * max(rtts), "pings": pings,
        "bytes": nbytes, "up_bytes_received": got, "down_bytes_received": down_got,
        "up_mbit_s": 8 * nbytes / max(up - rtt, 1e-6) / 1e6, "down_mbit_s": 8 * nbytes / max(down - rtt, 1e-6) / 1e6,
        "up_seconds": up, "down_seconds": down,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m classynet_eval.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer probes until --seconds have passed")
    s.add_argument("--listen", required=True, help="HOST:PORT (port 0 picks one, printed)")
    s.add_argument("--seconds", type=float, default=120)
    m = sub.add_parser("measure", help="measure RTT and throughput to a probe server, print JSON")
    m.add_argument("--to", required=True, help="HOST:PORT of the probe server (or of a relay in front of it)")
    m.add_argument("--pings", type=int, default=20)
    m.add_argument("--bytes", type=int, default=8 << 20)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        serve(a.listen, a.seconds)
    else:
        json.dump(measure(a.to, a.pings, a.bytes), sys.stdout)
        print()


if __name__ == "__main__":
    main()
