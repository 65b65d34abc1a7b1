"""What the fleet benchmarks (scripts/chaos, scripts/failover) share: child binaries with their
output kept, free loopback ports, the ONNX Runtime library, and a v2 client load that records
every answer."""
from __future__ import annotations

import os
import random
import re
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


class SetupError(RuntimeError):
    pass


def now() -> float:
    return time.monotonic()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ort_env() -> dict[str, str]:
    env = dict(os.environ)
    libs = sorted(ROOT.glob(".venv/lib/python*/site-packages/onnxruntime/capi/libonnxruntime.so*"))
    if libs:
        env.setdefault("ORT_DYLIB_PATH", str(libs[0]))
    # info: the edges log every failed forward and policy update, and the relays their stalls.
    env["RUST_LOG"] = "info"
    return env


class Proc:
    """A child binary whose stdout and stderr lines are kept (and logged to files) as they come."""

    def __init__(self, name: str, cmd: list[str], workdir: Path, env: dict[str, str]):
        self.name = name
        self.cmd = cmd
        self.log = workdir / f"{name}.log"
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  env=env, text=True, errors="replace")
        self.stdout: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(self.p.stdout, "out"), daemon=True),
                        threading.Thread(target=self._read, args=(self.p.stderr, "err"), daemon=True)]
        for r in self.readers:
            r.start()

    def _read(self, stream, which: str) -> None:
        with open(self.log, "a") as log:
            for line in stream:
                log.write(f"{which}: {line}")
                log.flush()
                with self.cond:
                    (self.stdout if which == "out" else self.lines).append(line.rstrip("\n"))
                    self.cond.notify_all()

    def wait_line(self, pattern: str, timeout: float, stdout: bool = True, start: int = 0) -> re.Match:
        """The first line from index `start` on that matches `pattern`; SetupError when the child
        exits or `timeout` passes first."""
        rx = re.compile(pattern)
        deadline = now() + timeout
        with self.cond:
            while True:
                lines = self.stdout if stdout else self.lines
                for line in lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                if self.p.poll() is not None and not any(r.is_alive() for r in self.readers):
                    raise SetupError(f"{self.name} exited ({self.p.returncode}) before printing /{pattern}/:\n"
                                     + self.tail())
                left = deadline - now()
                if left <= 0:
                    raise SetupError(f"{self.name} printed no /{pattern}/ within {timeout:.0f} s:\n" + self.tail())
                self.cond.wait(min(left, 0.2))

    def tail(self, n: int = 15) -> str:
        with self.cond:
            return "\n".join(f"    {line}" for line in (self.stdout + self.lines)[-n:])

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.p.send_signal(sig)

    def stop(self, timeout: float = 15) -> float:
        """SIGTERM, then SIGKILL after `timeout`; returns how long the exit took."""
        t0 = now()
        if self.alive():
            self.p.terminate()
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return now() - t0

    def kill(self) -> None:
        if self.alive():
            self.p.kill()
        self.p.wait()


class BlackHole:
    """A TCP listener that accepts every connection and never reads nor answers."""

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.held.append(conn)

    def close(self) -> int:
        self.stopping.set()
        self.thread.join()
        self.sock.close()
        for c in self.held:
            c.close()
        return len(self.held)


@dataclass
class Record:
    edge: int
    sent: float
    answered: float
    kind: str  # "ok", "error CODE" (a clean gRPC status from the edge), "unanswered"
    degraded: bool = False
    version: int = -1
    exit: int = -1
    # Exits on the edge: an answer from a later exit came from the cloud.
    edge_exits: int = 0

    @property
    def cloud(self) -> bool:
        """Answered by the cloud: OK, not degraded, from an exit past the edge's."""
        return self.kind == "ok" and not self.degraded and self.exit >= self.edge_exits


def parse_answer(resp) -> tuple[bool, int, int]:
    params = resp.parameters
    degraded = "classynet_degraded" in params
    version = params["classynet_policy_version"].int64_param if "classynet_policy_version" in params else -1
    exit_ = -1
    for out, raw in zip(resp.outputs, resp.raw_output_contents):
        if out.name == "exit" and len(raw) >= 4:
            exit_ = struct.unpack("<i", raw[:4])[0]
    return degraded, version, exit_


def infer_request(model: str, pixels: bytes, rid: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=rid)
    tensor = req.inputs.add()
    tensor.name = "input"
    tensor.datatype = "UINT8"
    tensor.shape.extend([1, 1, 28, 28])
    req.raw_input_contents.append(pixels)
    return req


class Load:
    """Per edge, `threads` clients each sending one single-sample request after another."""

    def __init__(self, edges: list[tuple[str, str]], threads: int, deadline_s: float, edge_exits: int):
        self.records: list[Record] = []
        self.edge_exits = edge_exits
        self.stopping = threading.Event()
        self.deadline_s = deadline_s
        self.workers = []
        for e, (addr, model) in enumerate(edges):
            channel = grpc.insecure_channel(addr)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for t in range(threads):
                self.workers.append(threading.Thread(target=self._run, args=(e, t, stub, model), daemon=True))

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self) -> None:
        self.stopping.set()
        for w in self.workers:
            # A call in flight ends by its deadline at the latest.
            w.join(self.deadline_s + 5)

    def _run(self, edge: int, thread: int, stub, model: str) -> None:
        rng = random.Random(edge * 100 + thread)
        n = 0
        while not self.stopping.is_set():
            req = infer_request(model, rng.randbytes(28 * 28), f"e{edge}-t{thread}-{n}")
            n += 1
            sent = now()
            try:
                resp = stub.ModelInfer(req, timeout=self.deadline_s)
                degraded, version, exit_ = parse_answer(resp)
                self.records.append(Record(edge, sent, now(), "ok", degraded, version, exit_, self.edge_exits))
            except grpc.RpcError as e:
                code = e.code()
                kind = "unanswered" if code == grpc.StatusCode.DEADLINE_EXCEEDED else f"error {code.name}"
                self.records.append(Record(edge, sent, now(), kind))
                # A refusal comes back at once: do not turn it into a busy loop.
                time.sleep(0.05)
            except Exception as e:  # noqa: BLE001 - anything else is a request nobody answered
                self.records.append(Record(edge, sent, now(), f"unanswered ({type(e).__name__})"))
                time.sleep(0.05)
